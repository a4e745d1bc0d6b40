"""A deterministic Backend for tests of the code around LMs (retry logic, resumption, fusion)."""

from __future__ import annotations

from tessera.lm.base import Backend, Generation


class ScriptedBackend(Backend):
    """``reply(conversation, attempt_temperature) -> text`` decides each reply; calls are recorded."""

    def __init__(self, reply=None, logprobs=None):
        super().__init__()
        self.reply = reply or (lambda conv, temperature: "")
        self.logprobs = logprobs or (lambda conv, candidates: {c: -1.0 for c in candidates})
        self.calls: list[dict] = []
        self.name = "scripted"

    def chat(self, conversations, *, max_new_tokens=256, temperature=0.0, top_p=1.0, seed=0, prefix="", stop_when=None):
        self.calls.append({"n": len(conversations), "temperature": temperature, "seed": seed, "prefix": prefix})
        out = []
        for c in conversations:
            text = self.reply(c, temperature)
            if isinstance(text, Exception):
                out.append(Generation("", 0, 0, "error", str(text)))
            else:
                out.append(Generation(prefix + text, 10, len(text.split()), "stop"))
        self.stats.add(calls=1, conversations=len(conversations), new_tokens=sum(g.new_tokens for g in out))
        return out

    def next_token_logprobs(self, conversations, candidates, prefix=""):
        self.calls.append({"n": len(conversations), "logprobs": True, "prefix": prefix})
        return [self.logprobs(c, candidates) for c in conversations]

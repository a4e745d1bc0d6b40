"""JSON extraction and repair on recorded SmolLM2-135M outputs; retries through generate_json."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from scripted import ScriptedBackend  # noqa: E402

from tessera.lm.jsonx import close_json, generate_json, is_looping, json_complete, parse_json_reply  # noqa: E402

HQ = ("domain", "key_concepts", "reasoning_patterns", "query")

# Replies the embedded SmolLM2-135M-Instruct wrote to the HQ prompt (prefix included), verbatim.
RECORDED = [
    # well-formed
    ('{"domain": "healthcare and medicine", "key_concepts": ["cathartinoma", "artery linensclerosis", "thinner arteries"],'
     '"reasoning_patterns": ["determining whether there is an association"], "query": "The relationship between '
     'atherosclerosis and thinning arteries can be investigated through studies involving cathsinomas."}',
     "json", "The relationship between atherosclerosis"),
    # stray brackets in the middle, query after a premature close: only field-by-field reading recovers it
    ('{"domain": "biomedical research and medical devices", "key_concepts": ["adipose tissue", "viscous adiposity"]}, '
     '{"reasoning_patterns": ["detecting an intrinsic pathway through the endothelial cell membrane"], "query": "The primary '
     'objective of this study was to elucidate the molecular mechanisms underlying the regulation of visceral adipose '
     'tissue (VAT).", "metabolic biology"}}]\n{\n    "id": "9bcbddea-ccee',
     "fields", "The primary objective"),
    # smart quotes and a trailing comma
    ('Sure! ```json\n{\u201cdomain\u201d: \u201cgenetics\u201d, \u201ckey_concepts\u201d: [\u201cTLR7\u201d,], '
     '\u201creasoning_patterns\u201d: [\u201cinference\u201d], \u201cquery\u201d: \u201cWhy would TLR7 matter here?\u201d}```',
     "repaired", "Why would TLR7"),
    # cut off by the token limit inside the query string
    ('{"domain": "oncology", "key_concepts": ["leukemia"], "reasoning_patterns": ["causal inference"], "query": "My 12-year-old '
     'daughter was told that chemo-resistant genes could be the cause of her',
     "repaired", "My 12-year-old daughter"),
]


def test_recorded_outputs_parse():
    for text, method, start in RECORDED:
        obj, how = parse_json_reply(text, HQ)
        assert obj is not None, text
        assert how == method, (how, text)
        assert obj["query"].startswith(start)


def test_no_query_is_a_failure():
    text = '{"domain": "the field", "key_concepts": ["concept", "concept"], "reasoning_patterns": ["causal inference"]}'
    assert parse_json_reply(text, HQ) == (None, "none")
    assert parse_json_reply("no json here at all", HQ) == (None, "none")
    # without required keys the first object is enough
    assert parse_json_reply('x {"a": 1} {"b": 2}')[0] == {"a": 1}


def test_close_json_and_loops():
    assert close_json('{"a": ["x", "y') == '{"a": ["x", "y"]}'
    assert close_json('{"a": {"b": 1,') == '{"a": {"b": 1}}'
    assert close_json('{"a":') == '{"a": ""}'
    assert is_looping('"TH2", "TH2", "TH2", "TH2"')
    assert is_looping("the cell the cell the cell")
    assert not is_looping("a b c d e f g h")


def test_json_complete_stops_after_last_field_only():
    done = json_complete(("domain", "query"))
    assert not done('{"domain": "x", "query": "still writ')
    assert done('{"domain": "x", "query": "finished"')
    assert not done('{"query": "finished"}')  # a key is missing
    assert done('{"domain": "growth", "key": ["factors", "factors", "factors", "factors"')  # a loop: give up early


def test_generate_json_retries_then_records_failure():
    # first attempt (greedy) gives garbage, the retry (sampling) gives JSON; one conversation never does
    def reply(conv, temperature):
        if conv[0]["content"] == "never":
            return "I cannot do that"
        return 'x", "query": "ok then"}' if temperature > 0 else "loop loop loop"

    b = ScriptedBackend(reply)
    res = generate_json(b, [[{"role": "user", "content": "a"}], [{"role": "user", "content": "never"}]],
                        keys=("domain", "query"), prefix='{"domain": "', retries=3)
    assert res[0].ok and res[0].value == {"domain": "x", "query": "ok then"} and res[0].attempts == 2
    assert not res[1].ok and res[1].attempts == 3 and len(res[1].raw) == 3 and "no JSON object" in res[1].error
    assert [c["temperature"] for c in b.calls] == [0.0, 0.7, 0.7]
    assert [c["n"] for c in b.calls] == [2, 2, 1]  # only unfinished conversations are asked again


def test_generate_json_validation_and_backend_errors():
    b = ScriptedBackend(lambda conv, t: RuntimeError("HTTP 500") if t == 0 else '{"query": "long enough query here"}')
    res = generate_json(b, [[{"role": "user", "content": "a"}]], keys=("query",),
                        validate=lambda o: None if len(o["query"].split()) > 3 else "too short")
    assert res[0].ok and res[0].attempts == 2
    b = ScriptedBackend(lambda conv, t: '{"query": "short"}')
    res = generate_json(b, [[{"role": "user", "content": "a"}]], keys=("query",), retries=2,
                        validate=lambda o: None if len(o["query"].split()) > 3 else "too short")
    assert not res[0].ok and res[0].error == "too short" and res[0].attempts == 2

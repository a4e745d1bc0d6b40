"""``python -m tessera.lm.llamacpp_server ARGS``: llama.cpp's OpenAI-compatible server (``llama_cpp.server``, the
same arguments) with the weights loaded as :class:`~tessera.lm.llamacpp.LlamaCppEngine` loads them.

On builds with AMX kernels ``python -m llama_cpp.server`` crashes on its first prompt (see
:func:`tessera.lm.llamacpp.extra_buffers`); this entry point loads the weights without llama.cpp's extra
buffer types there, and is otherwise the server itself.  Point ``tessera serve --lm-url`` (or ``ask``,
``retrieval synth``) at it.
"""

from __future__ import annotations


def main() -> None:
    from llama_cpp.server.__main__ import main as server_main

    from tessera.lm.llamacpp import _model_params, extra_buffers

    with _model_params(extra_buffers()):
        server_main()


if __name__ == "__main__":
    main()

"""``tessera serve``: the HTTP API and web page on 127.0.0.1 (see :mod:`tessera.serve`)."""

from __future__ import annotations

import typer


def serve_command(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; 127.0.0.1 keeps the server private to this machine."),
    port: int = typer.Option(8000, "--port", "-p", help="Port to listen on."),
    corpus: list[str] = typer.Option(["python-docs"], "--corpus", "-c",
                                     help="Corpus to serve (repeatable): 'python-docs' or a file/folder of .txt/.md/.rst/.jsonl documents. The first is the default."),
    lm: str = typer.Option("default", "--lm", help="Language model: 'default' (embedded SmolLM2-135M-Instruct), gguf:PATH, a local folder or a cached hub id."),
    engine: str = typer.Option("auto", "--engine", envvar="TESSERA_ENGINE", help="auto (llama.cpp for GGUF models when llama-cpp-python is installed, else tessera) | llamacpp | tessera | hf."),
    lm_url: str = typer.Option(None, "--lm-url", help="OpenAI-compatible server (vLLM, llama.cpp) that serves --lm; answers stream from it, --lm names its local copy (tokenizer, citations)."),
    lm_model: str = typer.Option(None, "--lm-model", help="The model's name on the --lm-url server when it differs from --lm (vLLM serves hub ids)."),
    encoder: str = typer.Option("default-encoder", "--encoder", "-e", help="Encoder for dense/hybrid retrieval; 'none' serves BM25 only."),
    prebuild_dense: bool = typer.Option(True, "--prebuild-dense/--lazy-dense", help="Build dense indexes in the background at start (else on first dense request)."),
    max_batch: int = typer.Option(4, "--max-batch", help="Requests answered at once: their tokens decode together (continuous batching on the llama.cpp engine) or go together to --lm-url; 1 answers one at a time."),
    queue_size: int = typer.Option(8, "--queue-size", help="Requests that may wait for the model; more get 429 with Retry-After."),
    timeout: float = typer.Option(180.0, "--timeout", help="Seconds a request may take, queue wait included (504 past it)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Default answer length in tokens (requests may ask for up to --max-new-tokens-limit)."),
    max_new_tokens_limit: int = typer.Option(512, "--max-new-tokens-limit", help="Longest answer a request may ask for."),
    max_upload_mb: float = typer.Option(10.0, "--max-upload-mb", help="Largest upload (all files of one request), in MiB."),
    max_upload_files: int = typer.Option(20, "--max-upload-files", help="Most files in one upload (1000 at most: the multipart parser reads no more)."),
    max_corpora: int = typer.Option(16, "--max-corpora", help="Most uploaded corpora kept at once."),
    body_timeout: float = typer.Option(30.0, "--body-timeout", help="Seconds a request body may stall before the server answers 408."),
):
    """Serve the ask API (FastAPI, OpenAPI at /openapi.json) and a web page with clickable citations."""
    from tessera.serve.engine import disable_mkl_buffer_pools

    disable_mkl_buffer_pools()  # before torch is imported: MKL's per-thread pools grow under worker threads
    from tessera.serve.app import serve
    from tessera.serve.config import ServeConfig

    cfg = ServeConfig(host=host, port=port, lm=lm, engine=engine, lm_url=lm_url, lm_model=lm_model, corpora=list(corpus), encoder=None if encoder.lower() == "none" else encoder,
                      prebuild_dense=prebuild_dense, max_batch=max_batch, queue_size=queue_size, request_timeout_s=timeout,
                      max_new_tokens=max_new_tokens, max_new_tokens_limit=max_new_tokens_limit,
                      max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_upload_files=max_upload_files,
                      max_uploaded_corpora=max_corpora, body_timeout_s=body_timeout)
    serve(cfg)

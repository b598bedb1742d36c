"""The shipped dummy-weight model directories load offline and their tokenizer fits the config."""

import hashlib
import json
import random
import subprocess
import sys

import pytest

transformers = pytest.importorskip("transformers")

MODELS = ["llama-3.1-8b-dummy", "tiny-llama-2l"]


@pytest.fixture(scope="module", params=MODELS)
def model_dir(request, repo_root):
    return repo_root / "configs/models" / request.param


@pytest.fixture(scope="module")
def tok(model_dir):
    return transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def test_config_loads_and_kv_geometry(model_dir):
    cfg = transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    assert cfg.architectures == ["LlamaForCausalLM"]
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert cfg.head_dim == 128  # the KV page geometry our kernels and store are sized for
    raw = json.loads((model_dir / "config.json").read_text())
    assert raw["torch_dtype"] == "bfloat16"
    # Without it transformers 5.x takes a local tokenizer for an old Mistral one and warns
    # about an "incorrect regex pattern".
    assert int(raw["transformers_version"].split(".")[0]) >= 5


def test_tokenizer_covers_vocab_and_specials(model_dir, tok):
    cfg = json.loads((model_dir / "config.json").read_text())
    assert len(tok) == cfg["vocab_size"], "every id a dummy model can emit must decode"
    assert tok.bos_token_id == cfg["bos_token_id"]
    assert tok.eos_token_id in cfg["eos_token_id"]
    assert tok.convert_tokens_to_ids("<|start_header_id|>") == 128006
    assert tok.convert_tokens_to_ids("<|eot_id|>") == 128009
    rng = random.Random(0)
    ids = [rng.randrange(cfg["vocab_size"]) for _ in range(5000)] + [0, cfg["vocab_size"] - 1]
    assert all(t is not None for t in tok.convert_ids_to_tokens(ids))
    assert isinstance(tok.decode(ids), str)


@pytest.mark.parametrize("text", [
    "Hello world, this is a test.\nSecond line: 12345 + 678 = 13023",
    "ünïcödé 你好 🙂 tabs\tand  double  spaces",
    "",
])
def test_tokenizer_round_trips_text(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.encode(text)[:1] == [tok.bos_token_id]


def test_chat_template(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief."
                    "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1 and ids.count(128009) == 2


def test_committed_tokenizer_is_reproducible(repo_root, tmp_path):
    pytest.importorskip("tokenizers")
    subprocess.run([sys.executable, str(repo_root / "scripts/make_tokenizer.py"), "--out",
                    str(tmp_path)], check=True, capture_output=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        new = hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
        old = hashlib.sha256(
            (repo_root / "configs/models/llama-3.1-8b-dummy" / name).read_bytes()).hexdigest()
        assert new == old, f"{name} differs from scripts/make_tokenizer.py output: rebuild it"


def test_unpack_writes_missing_or_stale_copy_and_follows_links(tmp_path):
    import lzma
    import os

    from dualpath.models import ensure_unpacked

    big, small = tmp_path / "big", tmp_path / "small"
    big.mkdir()
    small.mkdir()
    (big / "tokenizer.json.xz").write_bytes(lzma.compress(b'{"v": 1}'))
    (small / "tokenizer.json").symlink_to("../big/tokenizer.json")
    assert ensure_unpacked(small) == [big / "tokenizer.json"]  # unpacked at the link's target
    assert (small / "tokenizer.json").read_bytes() == b'{"v": 1}'
    assert ensure_unpacked(big) == []  # up to date: left alone
    (big / "tokenizer.json.xz").write_bytes(lzma.compress(b'{"v": 2}'))
    os.utime(big / "tokenizer.json", (1, 1))  # older than the new .xz: unpacked again
    assert ensure_unpacked(big) == [big / "tokenizer.json"]
    assert (big / "tokenizer.json").read_bytes() == b'{"v": 2}'
    assert sorted(p.name for p in big.iterdir()) == ["tokenizer.json", "tokenizer.json.xz"]
    assert ensure_unpacked(tmp_path) == []  # not a packed model dir


def test_unpack_keeps_old_copy_on_corrupt_archive(tmp_path):
    import lzma
    import os

    from dualpath.models import ensure_unpacked

    (tmp_path / "tokenizer.json").write_bytes(b"old")
    os.utime(tmp_path / "tokenizer.json", (1, 1))
    (tmp_path / "tokenizer.json.xz").write_bytes(lzma.compress(b"new")[:-8])
    with pytest.raises((lzma.LZMAError, EOFError)):
        ensure_unpacked(tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer.json.xz"]

"""`einpart import-hf`: Hugging Face checkpoints on disk -> spec + weights + mapping.

The first tests need only numpy: they write small checkpoints by hand to pin
the error messages, sharding, the CLI and mapping.json. The last ones build a
tiny random model of each family with transformers (torch CPU), save it with
`save_pretrained`, import it, and check that the reference interpreter's
logits equal the transformers model's, for a prefill and 3 greedy decode
steps through the KV cache. They are skipped when transformers is absent.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from einpart.cli_frontend import register
from einpart.errors import EinpartError
from einpart.frontend import stfile
from einpart.frontend.hf import import_hf, load_weights
from einpart.ir.model import Reference
from einpart.ir.parser import parse_file

D, F, H, G, K, L, V = 16, 32, 4, 2, 4, 2, 64


def llama_config(**kw):
    cfg = {"model_type": "llama", "hidden_size": D, "intermediate_size": F, "num_attention_heads": H,
           "num_key_value_heads": G, "head_dim": K, "num_hidden_layers": L, "vocab_size": V, "rms_norm_eps": 1e-5,
           "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "tie_word_embeddings": False}
    cfg.update(kw)
    return cfg


def llama_shapes():
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    for layer in range(L):
        p = f"model.layers.{layer}."
        shapes.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                       p + "self_attn.q_proj.weight": (H * K, D), p + "self_attn.k_proj.weight": (G * K, D),
                       p + "self_attn.v_proj.weight": (G * K, D), p + "self_attn.o_proj.weight": (D, H * K),
                       p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                       p + "mlp.down_proj.weight": (D, F)})
    return shapes


def write_checkpoint(folder, config, shapes, shards=1):
    """config.json plus the tensors (random), in `shards` files with an index when more than one."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    names = sorted(shapes)
    groups = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for i, group in enumerate(groups):
        fname = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        stfile.write_file(folder / fname, [(n, "f32", shapes[n], [rng.standard_normal(shapes[n])]) for n in group])
        weight_map.update({n: fname for n in group})
    if shards > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


# ------------------------------------------------------------- bad input
def test_unsupported_family_is_named_with_the_supported_ones(tmp_path):
    src = write_checkpoint(tmp_path / "bert", {"model_type": "bert"}, {})
    with pytest.raises(EinpartError) as e:
        import_hf(src, tmp_path / "out")
    assert str(e.value) == (f"{src}/config.json: unsupported model_type 'bert' "
                            "(supported: gpt2, llama, mistral, qwen2)")
    assert not (tmp_path / "out").exists()


def test_tensor_that_does_not_match_the_config(tmp_path):
    shapes = llama_shapes()
    shapes["model.layers.1.self_attn.k_proj.weight"] = (H * K, D)  # written for 4 kv heads, config says 2
    src = write_checkpoint(tmp_path / "ckpt", llama_config(), shapes)
    with pytest.raises(EinpartError) as e:
        import_hf(src, tmp_path / "out")
    assert str(e.value) == (f"{src}/model.safetensors: tensor 'model.layers.1.self_attn.k_proj.weight' has shape "
                            f"[16, 16], expected [8, 16] (num_key_value_heads * head_dim, hidden_size from "
                            f"config.json)")
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_missing_tensor(tmp_path):
    shapes = llama_shapes()
    del shapes["model.layers.1.mlp.up_proj.weight"]
    src = write_checkpoint(tmp_path / "ckpt", llama_config(), shapes)
    with pytest.raises(EinpartError) as e:
        import_hf(src, tmp_path / "out")
    assert str(e.value) == (f"{src}: tensor 'model.layers.1.mlp.up_proj.weight' is missing (expected shape "
                            f"[32, 16]: intermediate_size, hidden_size from config.json)")


@pytest.mark.parametrize("config, message", [
    (llama_config(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5}),
     "config.json: rope type 'llama3' is not supported (einpart's rope is the default, unscaled one)"),
    (llama_config(num_key_value_heads=3), "config.json: num_attention_heads = 4 is not a multiple of "
                                          "num_key_value_heads = 3"),
    (llama_config(hidden_size=None), "config.json: 'hidden_size' must be a positive integer, got None"),
    (llama_config(hidden_act="gelu"), "config.json: hidden_act 'gelu' is not supported (the llama family uses silu)"),
])
def test_configs_einpart_cannot_express(tmp_path, config, message):
    src = write_checkpoint(tmp_path / "ckpt", config, {})
    with pytest.raises(EinpartError) as e:
        import_hf(src, tmp_path / "out")
    assert str(e.value) == f"{src}/{message}"


def test_folder_without_config_or_weights(tmp_path):
    with pytest.raises(EinpartError, match=r": no config.json \(expected a Hugging Face model folder\)$"):
        import_hf(tmp_path, tmp_path / "out")
    (tmp_path / "config.json").write_text(json.dumps(llama_config()))
    with pytest.raises(EinpartError, match=r": no \*.safetensors files \(only safetensors checkpoints"):
        import_hf(tmp_path, tmp_path / "out")


# --------------------------------------------------- sharding, mapping, CLI
def test_sharded_checkpoint_stacks_and_transposes(tmp_path):
    shapes = llama_shapes()
    src = write_checkpoint(tmp_path / "ckpt", llama_config(), shapes, shards=3)
    r = import_hf(src, tmp_path / "out")
    graph = parse_file(r.spec_path)
    params = load_weights(r.weights_path)
    original = {}
    for f in src.glob("*.safetensors"):
        original.update(stfile.load_file(f))
    q = original["model.layers.1.self_attn.q_proj.weight"]  # [(g r k), d]
    np.testing.assert_array_equal(params["wq"][1], q.T.reshape(D, G, H // G, K))
    np.testing.assert_array_equal(params["w_down"][0], original["model.layers.0.mlp.down_proj.weight"].T)
    np.testing.assert_array_equal(params["unembed"], original["lm_head.weight"].T)
    mapping = json.loads(r.mapping_path.read_text())
    assert mapping["tensors"]["wq"] == {
        "shape": [L, D, G, H // G, K], "dtype": "f32", "from": ["model.layers.{l}.self_attn.q_proj.weight"],
        "transform": "transposed and split: [(g r k), d] -> [d, g, r, k]; query head g * R + r uses key-value "
                     "head g", "stacked": "over l = 0..1 ({l} in from)"}
    assert mapping["unused"] == []
    assert "size B = 1, T = 8, S = 64, D = 16, F = 32, H = 4, G = 2, R = H / G, K = 4, L = 2, V = 64" in \
        r.spec_path.read_text()
    logits, _ = Reference(graph, params).step(np.array([[1, 2, 3]]), 0, Reference(graph, params).new_state(1))
    assert logits.shape == (1, 3, V) and np.isfinite(logits).all()


def test_cli_writes_three_files_and_reports_them(tmp_path, capsys):
    src = write_checkpoint(tmp_path / "ckpt", llama_config(tie_word_embeddings=True), llama_shapes())
    parser = argparse.ArgumentParser(prog="einpart")
    register(parser.add_subparsers())
    args = parser.parse_args(["import-hf", str(src), "--out", str(tmp_path / "out"), "--dtype", "bf16"])
    assert args.func(args) == 0
    out = tmp_path / "out"
    assert capsys.readouterr().out.splitlines() == [
        f"{out}/model.ein: llama (D=16 F=32 H=4 G=2 K=4 L=2 V=64); run sizes B, T, S set with --set",
        f"{out}/weights.safetensors: 11 tensors, 12.3 KB (bf16)",
        f"{out}/mapping.json: where each tensor came from",
    ]
    text = (out / "model.ein").read_text()
    assert "param unembed" not in text and "logits[b, t, v] = hf[b, t, d] * embed[v, d]" in text
    assert "param wq[d, g, r, k] : bf16" in text
    assert json.loads((out / "mapping.json").read_text())["unused"] == ["lm_head.weight"]
    graph = parse_file(out / "model.ein", {"S": 16, "B": 2})
    weights = load_weights(out / "weights.safetensors")
    assert str(weights["wq"].dtype) == "bfloat16"
    ref = Reference(graph, weights)
    tokens, _ = ref.generate(np.array([[1, 2], [3, 4]]), 2)
    assert tokens.shape == (2, 2)


# ------------------------------------------------- against transformers
def hf_model(family: str, folder):
    """A tiny random model of the family, every parameter perturbed (so norms and biases are not 1 and 0)."""
    tf = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=128, max_position_embeddings=64)
    if family == "llama":  # grouped-query, biases, tied output, non-default theta and eps
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common, num_key_value_heads=2, attention_bias=True,
                                                   tie_word_embeddings=True, rope_theta=500000.0, rms_norm_eps=1e-5))
    elif family == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**common, num_key_value_heads=1))
    elif family == "qwen2":  # q/k/v biases
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, num_key_value_heads=2, rope_theta=1e6))
    else:
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=32,
                                                 bos_token_id=0, eos_token_id=0))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.eval()
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="40KB" if family == "llama" else "1GB")
    return model.to(torch.float32)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2"])
def test_logits_equal_transformers(tmp_path, family):
    model = hf_model(family, tmp_path / "hf")
    import torch
    if family == "llama":
        assert (tmp_path / "hf" / "model.safetensors.index.json").exists()  # sharded
    r = import_hf(tmp_path / "hf", tmp_path / "out")
    ref = Reference(parse_file(r.spec_path), load_weights(r.weights_path))
    prompt = np.array([[3, 17, 99, 5, 64], [1, 2, 3, 4, 120]], np.int32)
    tokens, history = ref.generate(prompt, 4)  # prefill, then 3 decode steps through the KV cache
    sequence = np.concatenate([prompt, tokens[:, :3]], axis=1)
    with torch.no_grad():
        want = model(torch.tensor(sequence, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(history[0], want[:, :5], rtol=1e-4, atol=2e-5)
    for step in range(1, 4):
        np.testing.assert_allclose(history[step][:, 0], want[:, 4 + step], rtol=1e-4, atol=2e-5)
    assert np.abs(want).max() > 0.5  # the logits are not all ~0: a wrong mapping could not pass

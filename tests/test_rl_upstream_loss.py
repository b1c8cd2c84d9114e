"""The RL update against upstream's own loss: minionerec_trainer.py's `compute_loss` and
`_get_per_token_logps`, run on transformers' PyTorch Qwen2 with the same weights, prompts,
completions and advantages as our `update_step`.

Upstream's module imports trl, accelerate and datasets, none of them installed here, so the test
takes the two methods' source out of the file (ast) and runs it as written against a stand-in
`self`; the only helper it supplies is trl's `selective_log_softmax` (log_softmax, then the entry
of each target id).
"""
from __future__ import annotations

import ast
import types
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests.upstream_oracle import UPSTREAM

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from trainer.model import hf_io  # noqa: E402
from trainer.model.qwen2 import build_model  # noqa: E402
from trainer.rl import rollout, update  # noqa: E402

VOCAB, NEWLINE, EOS = 120, 118, 119
HF_CONFIG = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=True)


def upstream_loss_fns():
    """(compute_loss, _get_per_token_logps) as defined in upstream's trainer class."""
    path = UPSTREAM / "minionerec_trainer.py"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    wanted = {"compute_loss", "_get_per_token_logps"}
    found = [f for node in ast.parse(path.read_text()).body if isinstance(node, ast.ClassDef)
             for f in node.body if isinstance(f, ast.FunctionDef) and f.name in wanted]
    assert {f.name for f in found} == wanted, f"{path}: {wanted} not found in a class"
    for f in found:
        f.decorator_list = []
    space = {"torch": torch,
             "selective_log_softmax": lambda logits, ids: torch.gather(
                 logits.log_softmax(-1), -1, ids.unsqueeze(-1)).squeeze(-1)}
    exec(compile(ast.Module(body=found, type_ignores=[]), str(path), "exec"), space)
    return space["compute_loss"], space["_get_per_token_logps"]


def torch_qwen2(seed: int):
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**HF_CONFIG, attn_implementation="eager"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def rollout_batch(seed: int = 0):
    """6 completions (a, b, c, newline, EOS) of 3 prompts, one prompt left padded, and advantages."""
    rng = np.random.default_rng(seed)
    prompt_ids = rng.integers(1, 100, size=(3, 7))
    prompt_mask = np.ones_like(prompt_ids)
    prompt_ids[2, :3], prompt_mask[2, :3] = EOS, 0  # upstream pads with EOS (pad_token = eos_token)
    sid_table = rng.integers(100, 118, size=(5, 3))
    sid_index = np.array([[0, 3], [1, 4], [2, 2]])
    completion = np.asarray(rollout.completion_tokens(jnp.asarray(sid_table), jnp.asarray(sid_index), NEWLINE, EOS))
    ids = np.concatenate([np.repeat(prompt_ids[:, None], 2, 1), completion], -1).reshape(6, -1)
    mask = np.concatenate([np.repeat(prompt_mask[:, None], 2, 1), np.ones_like(completion)], -1).reshape(6, -1)
    return ids, mask, rng.normal(size=6).astype(np.float32), prompt_ids.shape[1]


@pytest.mark.parametrize("beta", [1e-3, 0.5])
def test_update_matches_upstream_compute_loss(tmp_path, beta):
    compute_loss, per_token_logps = upstream_loss_fns()
    policy, reference = torch_qwen2(0), torch_qwen2(1)
    policy.save_pretrained(tmp_path / "policy")
    reference.save_pretrained(tmp_path / "reference")
    ids, mask, adv, n_prompt = rollout_batch()

    # Upstream: its completion mask keeps every token up to and including the first EOS.
    completion = torch.tensor(ids[:, n_prompt:])
    is_eos = completion == EOS
    completion_mask = (torch.arange(completion.shape[1]) <= is_eos.int().argmax(1, keepdim=True)).int()
    assert completion_mask.sum().item() == completion.numel() == 6 * 5  # a, b, c, newline and the EOS
    fake = types.SimpleNamespace(beta=beta, dapo=False, gspo=False, _metrics=defaultdict(list),
                                 accelerator=types.SimpleNamespace(gather_for_metrics=lambda x: x))
    fake._get_per_token_logps = lambda *a: per_token_logps(fake, *a)
    full_mask = torch.cat([torch.tensor(mask[:, :n_prompt]), completion_mask], 1)
    with torch.no_grad():
        ref_logps = per_token_logps(fake, reference, torch.tensor(ids), full_mask, completion.shape[1])
    inputs = {"prompt_ids": torch.tensor(ids[:, :n_prompt]), "prompt_mask": torch.tensor(mask[:, :n_prompt]),
              "completion_ids": completion, "completion_mask": completion_mask,
              "ref_per_token_logps": ref_logps, "advantages": torch.tensor(adv)}
    loss = compute_loss(fake, policy, inputs)
    loss.backward()
    with torch.no_grad():
        their_logps = per_token_logps(fake, policy, torch.tensor(ids), full_mask, completion.shape[1]).numpy()
        for p in policy.parameters():
            p.copy_(p.grad)
    policy.save_pretrained(tmp_path / "grads")  # the gradients, in transformers' layout

    # Ours: one SGD(lr=1) update_step, so params - new params is our gradient.
    cfg, params = hf_io.import_hf(tmp_path / "policy")
    _, ref_params = hf_io.import_hf(tmp_path / "reference")
    _, their_grads = hf_io.import_hf(tmp_path / "grads")
    graphdef = nnx.graphdef(build_model(cfg, seed=0))
    logprobs, update_step = update.make_phase_fns(graphdef, optax.sgd(1.0), clip_eps=0.2, kl_coef=beta)
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "advantages": jnp.asarray(adv),
             "ref_logp": logprobs(ref_params, jnp.asarray(ids), jnp.asarray(mask))}
    our_logps = np.asarray(logprobs(params, jnp.asarray(ids), jnp.asarray(mask)))
    before = jax.tree.map(np.array, params)
    after, _, metrics = update_step(params, optax.sgd(1.0).init(params), batch)
    our_grads = jax.tree.map(lambda a, b: a - np.asarray(b), before, after)

    np.testing.assert_allclose(our_logps, their_logps, atol=1e-4)
    assert float(metrics["loss"]) == pytest.approx(loss.item(), abs=1e-5)
    assert float(metrics["kl"]) == pytest.approx(np.mean(fake._metrics["kl"]), rel=1e-3)
    flat_ours, flat_theirs = jax.tree.leaves(our_grads), jax.tree.leaves(their_grads)
    scale = max(float(np.abs(g).max()) for g in flat_theirs)
    assert scale > 1e-3  # the comparison has something to compare
    for ours, theirs in zip(flat_ours, flat_theirs):
        np.testing.assert_allclose(ours, theirs, atol=1e-4 * scale)

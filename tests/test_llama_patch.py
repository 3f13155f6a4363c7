"""Whole-model patches: a tiny Llama-3.2-shaped model (GQA, llama3 rope scaling, tied embeddings)
patched vs unpatched, the fused-loss forward, reverting, idempotence, PEFT, dispatch by model type."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from _helpers import SHAPE, VOCAB, assert_same_grads, batch, llama_config, loss_and_grads, skip_unless_path, tiny_llama
from _reference import rel_err
from transformers import LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.models.llama import modeling_llama

from liger_align.models import apply_liger_kernel, apply_liger_kernel_to_llama
from liger_align.models._causal_lm import causal_lm_forward
from liger_align.models._layers import rms_norm_forward, swiglu_mlp_forward


def test_patched_instance_matches_unpatched_loss_and_gradients():
    ref = tiny_llama().train()
    model = copy.deepcopy(ref)
    ids, labels = batch()
    want, want_grads = loss_and_grads(ref, ids, labels)  # before patching: RoPE is patched module-wide
    handle = apply_liger_kernel_to_llama(model=model)
    assert any("mlp" in p for p in handle.patched) and any("norm" in p for p in handle.patched)
    got, got_grads = loss_and_grads(model, ids, labels)
    assert got.logits is None and want.logits is not None
    assert rel_err(got.loss, want.loss) < 1e-5
    assert_same_grads(got_grads, want_grads, 1e-4)
    # the patch is real: the layers run liger-align's forwards
    assert model.model.norm.forward.__func__ is rms_norm_forward
    assert model.model.layers[0].mlp.forward.__func__ is swiglu_mlp_forward
    handle.revert()


def test_gradient_checkpointing():
    ref = tiny_llama().train()
    model = copy.deepcopy(ref)
    ids, labels = batch()
    want, want_grads = loss_and_grads(ref, ids, labels)
    model.gradient_checkpointing_enable()
    with apply_liger_kernel_to_llama(model=model):
        got, got_grads = loss_and_grads(model, ids, labels)
    assert rel_err(got.loss, want.loss) < 1e-5
    assert_same_grads(got_grads, want_grads, 1e-4)


def test_num_items_in_batch_and_shift_labels():
    ref = tiny_llama().train()
    model = copy.deepcopy(ref)
    ids, labels = batch(3, 29)
    n_items = torch.tensor(57)
    want, want_grads = loss_and_grads(ref, ids, labels, num_items_in_batch=n_items)
    logits = ref(input_ids=ids).logits.double()
    with apply_liger_kernel_to_llama(model=model):
        got, got_grads = loss_and_grads(model, ids, labels, num_items_in_batch=n_items)
        assert rel_err(got.loss, want.loss) < 1e-5
        assert_same_grads(got_grads, want_grads, 1e-4)
        # sum over valid shifted tokens / num_items_in_batch, computed by hand from the logits
        shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
        by_hand = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), shifted.reshape(-1),
        reduction="sum") / 57
        assert rel_err(got.loss, by_hand) < 1e-5
        # shift_labels given: used as is
        explicit = model(input_ids=ids, shift_labels=shifted).loss
        assert rel_err(explicit, want.loss * 57 / (shifted != -100).sum()) < 1e-5


def test_eval_returns_logits_as_before():
    ref = tiny_llama().eval()
    model = copy.deepcopy(ref)
    ids, labels = batch()
    with torch.no_grad():
        want = ref(input_ids=ids, labels=labels)
    with apply_liger_kernel_to_llama(model=model), torch.no_grad():
        got = model(input_ids=ids, labels=labels)
        assert got.logits is not None and got.logits.shape == (2, 37, VOCAB)
        assert rel_err(got.logits, want.logits) < 1e-5 and rel_err(got.loss, want.loss) < 1e-5
        last = model(input_ids=ids, logits_to_keep=1).logits
        assert last.shape == (2, 1, VOCAB) and rel_err(last, want.logits[:, -1:]) < 1e-5
        tup = model(input_ids=ids, return_dict=False)
        assert isinstance(tup, tuple) and rel_err(tup[0], want.logits) < 1e-5


def test_generate_unchanged():
    model = tiny_llama().eval()
    ids, _ = batch(2, 9)
    want = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with apply_liger_kernel_to_llama(model=model):
        got = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


@pytest.mark.parametrize("training", [True, False])
def test_logprob_targets(training):
    ref = tiny_llama().train(training)
    model = copy.deepcopy(ref)
    ids, labels = batch()
    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    logp = torch.log_softmax(ref(input_ids=ids).logits.float(), -1)
    want = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * (targets != -100)
    with apply_liger_kernel_to_llama(model=model):
        out = model(input_ids=ids, logprob_targets=targets)
        assert out.logits is None and out.logps.shape == (2, 37) and out.logps.dtype == torch.float32
        assert rel_err(out.logps, want) < 1e-5
        assert torch.all(out.logps[targets == -100] == 0)
        weights = torch.randn(2, 37)
        got_grads = torch.autograd.grad((out.logps * weights).sum(), list(model.parameters()))
        want_grads = torch.autograd.grad((want * weights).sum(), list(ref.parameters()))
        for g, w in zip(got_grads, want_grads):
            assert rel_err(g, w) < 1e-4
        with pytest.raises(ValueError, match=r"logprob_targets must have shape \(B, T\) = \(2, 37\)"):
            model(input_ids=ids, logprob_targets=targets[:, :-1])


@pytest.mark.slow
def test_thirty_step_training_curves_match():
    """Convergence: AdamW on a fixed batch, same seed; the patched curve tracks the unpatched one."""
    ids, labels = batch(4, 33, seed=1)
    curves = []
    for patched in (False, True):
        model = tiny_llama(seed=123).train()
        handle = apply_liger_kernel_to_llama(model=model) if patched else None
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        losses = []
        for _ in range(30):
            opt.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(torch.tensor(losses))
        if handle:
            handle.revert()
    plain, liger = curves
    assert plain[-1] < 0.7 * plain[0]  # it learns
    assert ((plain - liger).abs() / plain).max() < 2e-3


def test_class_patch_revert_and_patch_again():
    original_norm = modeling_llama.LlamaRMSNorm.forward
    original_mlp = modeling_llama.LlamaMLP.forward
    original_rope = modeling_llama.apply_rotary_pos_emb
    original_forward = LlamaForCausalLM.forward
    ids, labels = batch()
    ref = tiny_llama().train()
    want = ref(input_ids=ids, labels=labels).loss
    for _ in range(2):  # patch, revert, patch again
        handle = apply_liger_kernel_to_llama()
        try:
            assert modeling_llama.LlamaRMSNorm.forward is rms_norm_forward
            assert modeling_llama.LlamaMLP.forward is swiglu_mlp_forward
            assert LlamaForCausalLM.forward is causal_lm_forward
            assert modeling_llama.apply_rotary_pos_emb is not original_rope
            model = copy.deepcopy(ref)  # built before the patch: the class patch covers it too
            out = model(input_ids=ids, labels=labels)
            assert out.logits is None and rel_err(out.loss, want) < 1e-5
            fresh = LlamaForCausalLM(llama_config()).train()  # built after
            assert fresh(input_ids=ids, labels=labels).logits is None
        finally:
            handle.revert()
        assert modeling_llama.LlamaRMSNorm.forward is original_norm
        assert modeling_llama.LlamaMLP.forward is original_mlp
        assert modeling_llama.apply_rotary_pos_emb is original_rope
        assert LlamaForCausalLM.forward is original_forward
        assert ref(input_ids=ids, labels=labels).logits is not None
    handle.revert()  # idempotent


def test_selected_flags_only():
    with apply_liger_kernel_to_llama(rope=False, swiglu=False, fused_linear_cross_entropy=False) as handle:
        assert modeling_llama.LlamaRMSNorm.forward is rms_norm_forward
        assert modeling_llama.LlamaMLP.forward is not swiglu_mlp_forward
        assert LlamaForCausalLM.forward is not causal_lm_forward
        assert handle.patched == ["LlamaRMSNorm.forward"]
    assert modeling_llama.LlamaRMSNorm.forward is not rms_norm_forward


def test_instance_patch_twice_is_idempotent():
    model = tiny_llama().train()
    ids, labels = batch()
    first = apply_liger_kernel_to_llama(model=model)
    norm_forward = model.model.norm.forward
    loss_once = model(input_ids=ids, labels=labels).loss
    second = apply_liger_kernel_to_llama(model=model)
    assert model.model.norm.forward is norm_forward  # not wrapped twice
    assert torch.equal(model(input_ids=ids, labels=labels).loss, loss_once)
    first.revert()
    assert model(input_ids=ids, labels=labels).logits is None  # still held by the second handle
    second.revert()
    assert "forward" not in vars(model.model.norm) and "forward" not in vars(model)
    assert modeling_llama.apply_rotary_pos_emb is getattr(modeling_llama.apply_rotary_pos_emb, "original",
                                                          modeling_llama.apply_rotary_pos_emb)
    assert model(input_ids=ids, labels=labels).logits is not None
    other = tiny_llama().train()  # instance patches never touch other instances' layers
    with apply_liger_kernel_to_llama(model=model):
        assert "forward" not in vars(other.model.norm)
        assert other(input_ids=ids, labels=labels).logits is not None


def test_peft_lora_model():
    peft = pytest.importorskip("peft")
    base = tiny_llama().train()
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    torch.manual_seed(7)
    ref = peft.get_peft_model(copy.deepcopy(base), lora)
    torch.manual_seed(7)
    model = peft.get_peft_model(copy.deepcopy(base), lora)
    ids, labels = batch()
    want, want_grads = loss_and_grads(ref, ids, labels)
    handle = apply_liger_kernel(model)
    assert any(p.endswith("mlp.forward") for p in handle.patched)
    got, got_grads = loss_and_grads(model, ids, labels)
    assert got.logits is None
    assert rel_err(got.loss, want.loss) < 1e-5
    assert any("lora_A" in n for n in got_grads) and not any("embed" in n for n in got_grads)
    assert_same_grads(got_grads, want_grads, 1e-4)
    handle.revert()
    assert model(input_ids=ids, labels=labels).logits is not None


def _tiny(cls, config_cls, **extra):
    config = config_cls(**SHAPE, attn_implementation="eager", **extra)
    return cls(config).train()


@pytest.mark.parametrize("cls,config_cls", [(Qwen2ForCausalLM, Qwen2Config), (MistralForCausalLM, MistralConfig)])
def test_apply_liger_kernel_other_families(cls, config_cls):
    ref = _tiny(cls, config_cls)
    model = copy.deepcopy(ref)
    ids, labels = batch()
    want, want_grads = loss_and_grads(ref, ids, labels)
    with apply_liger_kernel(model) as handle:
        assert len(handle.patched) >= 7
        got, got_grads = loss_and_grads(model, ids, labels)
        assert got.logits is None and rel_err(got.loss, want.loss) < 1e-5
        assert_same_grads(got_grads, want_grads, 1e-4)


def test_unsupported_model_type_gets_only_the_proven_fused_loss():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50)).train()
    ids = torch.randint(0, 50, (2, 9))
    torch.manual_seed(5)  # GPT-2 trains with dropout: the same draws on both sides
    want = model(input_ids=ids, labels=ids).loss
    before = {n: type(m).forward for n, m in model.named_modules()}
    with pytest.warns(UserWarning, match=r"model_type='gpt2'.*1 patched \(GPT2LMHeadModel.forward\).*unchanged"):
        handle = apply_liger_kernel(model)
    assert handle.patched == ["GPT2LMHeadModel.forward"]  # no RMSNorm, gated MLP or RoPE to patch
    assert all("forward" not in vars(m) for m in model.modules() if m is not model)
    torch.manual_seed(5)
    out = model(input_ids=ids, labels=ids)
    assert out.logits is None and torch.allclose(out.loss, want, rtol=1e-5)
    handle.revert()
    assert {n: type(m).forward for n, m in model.named_modules()} == before and "forward" not in vars(model)
    with pytest.raises(TypeError, match="unknown flags"):
        apply_liger_kernel(model, layer_norms=True)  # layer_norm is a (Qwen2-VL) flag


def test_non_silu_mlp_is_not_patched():
    model = tiny_llama(hidden_act="gelu").train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = apply_liger_kernel_to_llama(model=model)
    assert any("SiLU" in str(w.message) for w in caught)
    assert not any("mlp" in p for p in handle.patched)
    handle.revert()


@pytest.mark.interpreter
@pytest.mark.slow
def test_triton_interpreter_whole_model(monkeypatch):
    """The Triton kernels (interpreter on CPU) inside the model: same loss and gradients."""
    skip_unless_path("cpu", "triton")
    from liger_align.kernels.layers.rms_norm import RMSNormFunction
    from liger_align.kernels.layers.rope import RoPEFunction
    from liger_align.kernels.layers.swiglu import SwiGLUFunction

    launches = {}
    for fn in (RMSNormFunction, RoPEFunction, SwiGLUFunction):
        def counting(*args, _fn=fn, _apply=fn.apply):
            launches[_fn.__name__] = launches.get(_fn.__name__, 0) + 1
            return _apply(*args)
        monkeypatch.setattr(fn, "apply", counting)
    ref = tiny_llama().train()
    model = copy.deepcopy(ref)
    ids, labels = batch(1, 13)
    want, want_grads = loss_and_grads(ref, ids, labels)
    with apply_liger_kernel_to_llama(model=model):
        got, got_grads = loss_and_grads(model, ids, labels)
    assert launches == {"RMSNormFunction": 5, "RoPEFunction": 2, "SwiGLUFunction": 2}
    assert rel_err(got.loss, want.loss) < 1e-5
    assert_same_grads(got_grads, want_grads, 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_whole_model(dtype):
    ref = tiny_llama().to("cuda", dtype).train()
    model = copy.deepcopy(ref)
    ids, labels = (t.cuda() for t in batch(4, 257))
    want, want_grads = loss_and_grads(ref, ids, labels)
    with apply_liger_kernel_to_llama(model=model):
        got, got_grads = loss_and_grads(model, ids, labels)
    loss_tol, grad_tol = (1e-5, 1e-4) if dtype == torch.float32 else (1e-2, 5e-2)
    assert got.logits is None
    assert rel_err(got.loss, want.loss) < loss_tol
    assert_same_grads(got_grads, want_grads, grad_tol)

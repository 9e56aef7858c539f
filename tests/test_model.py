"""Model building: what each ``model.activation_checkpointing`` mode recomputes in backward."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from train.model import build_model, transformer_blocks
from train.config.recipe import recipe_from_dict

LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2}


class OpCounter(TorchDispatchMode):
    """Counts the aten operators that run while it is active (by name, overloads together)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def backward_ops(mode) -> tuple[Counter, float, list[torch.Tensor]]:
    recipe = recipe_from_dict({"model": {"config": LLAMA, "activation_checkpointing": mode}})
    model = build_model(recipe.model, 256, seed=0)
    model.train()
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    with OpCounter() as counter:
        loss.backward()
    return counter.ops, loss.item(), [p.grad for p in model.parameters()]


def test_selective_checkpointing_recomputes_the_cheap_ops_and_keeps_the_matmuls():
    """Backward under ``false`` runs only gradient kernels; ``true`` re-runs each block's forward
    (its matmuls and attention too); ``selective`` re-runs the norms and activations but no matmul
    and no attention. The gradients are the same in all three."""
    none, loss, grads = backward_ops(False)
    selective, loss_s, grads_s = backward_ops("selective")
    full, loss_f, grads_f = backward_ops(True)
    assert loss == loss_s == loss_f
    for other in (grads_s, grads_f):
        assert all(torch.equal(a, b) for a, b in zip(grads, other))
    attention = "_scaled_dot_product_flash_attention_for_cpu"
    assert none["rsqrt"] == none["silu"] == none[attention] == 0  # nothing recomputed
    layers = LLAMA["num_hidden_layers"]
    assert selective["rsqrt"] == full["rsqrt"] == 2 * layers  # both norms of each block, recomputed
    assert selective["silu"] == full["silu"] == layers
    assert selective["mm"] == none["mm"] and selective[attention] == 0  # the saved outputs are reused
    assert full["mm"] == none["mm"] + 6 * layers and full[attention] == layers  # q k v o gate up... recomputed


def test_activation_checkpointing_accepts_true_false_or_selective():
    from train.config.typed import RecipeError

    assert recipe_from_dict({"model": {"activation_checkpointing": "selective"}}).model.activation_checkpointing == "selective"
    with pytest.raises(RecipeError, match="activation_checkpointing: 'some' is not one of False, True, 'selective'"):
        recipe_from_dict({"model": {"activation_checkpointing": "some"}})


def test_compiled_blocks_with_selective_checkpointing_train_like_eager_on_cpu():
    """``model.compile`` (inductor, on the CPU here) with selective checkpointing inside the compiled
    blocks: the same loss and gradients as the eager model, to float rounding."""
    def loss_and_grads(compile_: bool) -> tuple[float, list[torch.Tensor]]:
        recipe = recipe_from_dict({"model": {"config": LLAMA, "activation_checkpointing": "selective",
                                             "compile": compile_}})
        model = build_model(recipe.model, 256, seed=0)
        blocks = transformer_blocks(model)
        assert len(blocks) == 2 and all((b._compiled_call_impl is not None) == compile_ for b in blocks)
        model.train()
        ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), [p.grad for p in model.parameters()]

    eager_loss, eager_grads = loss_and_grads(False)
    compiled_loss, compiled_grads = loss_and_grads(True)
    assert compiled_loss == pytest.approx(eager_loss, abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(eager_grads, compiled_grads))

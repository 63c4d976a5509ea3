"""The torch backend's fast path: LAMB's and LARS's step over all float32
variables at once with grouped `torch._foreach_*` kernels.

In the spirit of Keras's own torch optimizers
(`keras/src/backend/torch/optimizers/torch_adam.py`): the moments are
updated in place, the norms come from `torch._foreach_norm`, and the weights
move with one `_foreach_addcmul_` whose per-variable scale (learning rate
times trust ratio) is a 0-dim tensor, so no step reads a value back to the
host. The equations are those of `LAMB._layerwise_update` and
`LARS._layerwise_update` (the backend-neutral path, itself checked against
the papers' per-variable reference); tests/test_fast_path.py checks this path
against the reference path on the torch backend. Imported only when Keras
runs on torch.
"""

import torch
from keras import ops


def applies(variables):
    """Whether the grouped step can take `variables`: float32 only (the
    step of float16/bfloat16/float64 variables keeps the backend-neutral
    path, which computes in their compute dtype)."""
    return bool(variables) and all(
        str(v.dtype) == "float32" for v in variables)


def _record(optimizer, indices, w_norms, update_norms, ratios, lr):
    """The trust-ratio statistics of every variable (when tracking)."""
    if optimizer._stats is None:
        return
    for k, index in enumerate(indices):
        optimizer._record_stats(
            index, weight_norm=w_norms[k], update_norm=update_norms[k],
            trust_ratio=ratios[k], learning_rate=lr * ratios[k])


def _ratios(adapted, compute, count, dtype, device):
    """A vector of `count` trust ratios: `compute(positions)` for the
    adapted positions, 1 elsewhere."""
    ratios = torch.ones(count, dtype=dtype, device=device)
    positions = [k for k, a in enumerate(adapted) if a]
    if positions:
        ratios[positions] = compute(positions)
    return ratios


def _gather(optimizer, grads, variables):
    """`(indices, weights, gradients, slot lists)`: the torch tensors the
    step updates in place, slot by slot (`optimizer._slots`)."""
    indices = [optimizer._get_variable_index(v) for v in variables]
    w = [v.value for v in variables]
    g = [ops.convert_to_tensor(grad, "float32") for grad in grads]
    slots = zip(*(optimizer._slots(i) for i in indices))
    return indices, w, g, [[slot.value for slot in s] for s in slots]


@torch.no_grad()
def lamb_update(optimizer, grads, variables, learning_rate):
    """LAMB's step (`LAMB._layerwise_update`) on float32 `variables`."""
    indices, w, g, (m, v) = _gather(optimizer, grads, variables)
    scalars = optimizer._step_scalars(learning_rate, "float32")
    lr, c1 = scalars["lr"], scalars["c1"]
    # m_t = m + (1 - beta_1)(g - m), v_t = beta_2 v + (1 - beta_2) g^2,
    # both in place.
    torch._foreach_lerp_(m, g, 1 - optimizer.beta_1)
    torch._foreach_mul_(v, optimizer.beta_2)
    torch._foreach_addcmul_(v, g, g, value=1 - optimizer.beta_2)
    # u = c_1 m / (sqrt(v) + epsilon_t) + weight_decay w
    u = torch._foreach_sqrt(v)
    torch._foreach_add_(u, scalars["epsilon"])
    torch._foreach_reciprocal_(u)
    torch._foreach_mul_(u, m)
    torch._foreach_mul_(u, c1)
    decayed = [k for k, i in enumerate(indices) if optimizer._apply_decay[i]]
    if decayed and optimizer.weight_decay:
        torch._foreach_add_([u[k] for k in decayed], [w[k] for k in decayed],
                            alpha=optimizer.weight_decay)
    adapted = [optimizer._apply_adaptation[i] for i in indices]
    tracking = optimizer._stats is not None
    if any(adapted) or tracking:
        w_norms = torch.stack(torch._foreach_norm(w))
        u_norms = torch.stack(torch._foreach_norm(u))
        ratios = _ratios(
            adapted, lambda p: optimizer._trust_ratio(w_norms[p], u_norms[p]),
            len(w), w_norms.dtype, w_norms.device)
        _record(optimizer, indices, w_norms, u_norms, ratios, lr)
        steps = torch.unbind(-lr * ratios)
        torch._foreach_addcmul_(w, u, steps)  # w - lr r u
    else:
        torch._foreach_mul_(u, -lr)
        torch._foreach_add_(w, u)


@torch.no_grad()
def lars_update(optimizer, grads, variables, learning_rate):
    """LARS's step (`LARS._layerwise_update`) on float32 `variables`.

    The norms of w and g are read only for the variables adapted (or
    tracked); then the momentum and the weights move in blocks of about
    `BLOCK` values, all four passes over one block before the next, so that
    w, g and v are read from memory once and the later passes hit the
    cache (grouped per pass over all variables, each pass streamed the
    whole model from memory again).
    """
    indices, w, g, (velocity,) = _gather(optimizer, grads, variables)
    lr = optimizer._step_scalars(learning_rate, "float32")["lr"]
    wd = optimizer.weight_decay
    count = len(w)
    decay = [bool(wd) and optimizer._apply_decay[i] for i in indices]
    adapted = [optimizer._apply_adaptation[i] for i in indices]
    tracking = optimizer._stats is not None
    normed = [k for k in range(count) if adapted[k] or tracking]
    step_sizes = [lr] * count  # the same 0-dim tensor where not adapted
    if normed:
        w_norms = torch.stack(torch._foreach_norm([w[k] for k in normed]))
        g_norms = torch.stack(torch._foreach_norm([g[k] for k in normed]))
        wds = torch.tensor([wd if decay[k] else 0.0 for k in normed],
                           dtype=w_norms.dtype, device=w_norms.device)
        ratios = _ratios(
            [adapted[k] for k in normed], lambda p: optimizer._trust_ratio(
                w_norms[p], g_norms[p], wds[p], lr),
            len(normed), w_norms.dtype, w_norms.device)
        _record(optimizer, [indices[k] for k in normed], w_norms, g_norms,
                ratios, lr)
        for k, step_size in zip(normed, torch.unbind(lr * ratios)):
            step_sizes[k] = step_size
    for block in _blocks(w, g, velocity, step_sizes, decay):
        _lars_block(optimizer, *zip(*block))


# Values per block of `lars_update`: w, g and v of a block (12 MB) stay in
# a 32 MB L3 cache across its passes.
BLOCK = 1 << 20


def _blocks(*per_variable):
    """Lists of `(w, g, v, step size, decay)` pieces of at most about
    `BLOCK` values each: small variables grouped, large ones cut into
    flat slices (views, updated in place)."""
    pieces = []
    for w, g, v, step_size, decay in zip(*per_variable):
        size = w.numel()
        if size <= BLOCK:
            pieces.append((size, (w, g, v, step_size, decay)))
            continue
        # Views of w and v (updated in place); g is only read.
        flat = [w.view(-1), g.reshape(-1), v.view(-1)]
        for start in range(0, size, BLOCK):
            piece = [x[start:start + BLOCK] for x in flat]
            pieces.append((piece[0].numel(), (*piece, step_size, decay)))
    blocks, block, total = [], [], 0
    for size, piece in pieces:
        if block and total + size > BLOCK:
            blocks.append(block)
            block, total = [], 0
        block.append(piece)
        total += size
    if block:
        blocks.append(block)
    return blocks


def _lars_block(optimizer, w, g, velocity, step_sizes, decay):
    """LARS's velocity and weight update on one block of pieces."""
    w, g, velocity, step_sizes = map(list, (w, g, velocity, step_sizes))
    decayed = [k for k, d in enumerate(decay) if d]
    torch._foreach_mul_(velocity, optimizer.momentum)
    if not optimizer.nesterov:
        # v_t = momentum v + lr r (g + wd w), accumulated in place: no
        # step tensor is formed; then w = w - v_t.
        torch._foreach_addcmul_(velocity, g, step_sizes)
        if decayed:
            torch._foreach_addcmul_([velocity[k] for k in decayed],
                                    [w[k] for k in decayed],
                                    [step_sizes[k] for k in decayed],
                                    value=optimizer.weight_decay)
        torch._foreach_add_(w, velocity, alpha=-1.0)
        return
    # Nesterov needs the step itself: w = w - (momentum v_t + step).
    step = torch._foreach_mul(g, step_sizes)
    if decayed:
        torch._foreach_addcmul_([step[k] for k in decayed],
                                [w[k] for k in decayed],
                                [step_sizes[k] for k in decayed],
                                value=optimizer.weight_decay)
    torch._foreach_add_(velocity, step)
    torch._foreach_add_(w, step, alpha=-1.0)
    torch._foreach_add_(w, velocity, alpha=-optimizer.momentum)

"""Backward passes of the encoder and decoder that touch only the few active codes (CPU training).

TopK, BatchTopK and (mostly inactive) ReLU training use the pre-activations [batch, d_sae] at a few entries
per token (k of 2,304). Autograd through `pre[rows, columns]` builds the gradient of the whole
pre-activation matrix (zeros, then a scatter) and multiplies it densely: grad W_enc = x^T @ G, a
[d_in, batch] x [batch, d_sae] matmul as costly as the forward one. Here the same gradient is G^T, held in
CSR form with only the selected entries, times x: about k / d_sae of the multiply-adds (batch 2048, d_in 576,
d_sae 2304, k 60, one thread: 30-40 ms against ~200 ms for the dense product, benchmarks/train_throughput.py
measures the whole step). The forward pass is unchanged: one dense matmul, no gradient kept.

`SelectablePreActivations.at(rows, columns)` gives the pre-activations there with that backward;
`.dense()` gives all of them with the ordinary dense backward (for steps where most codes are active).

The decoder side, `sparse_decode`: the forward is embedding_bag (the active decoder rows, summed per token);
its backward is the same CSR product for the decoder's gradient (G^T @ grad) and a sampled matmul for the
codes' gradient (grad @ W_dec^T at the active entries only), in float32; together about half the time of
embedding_bag's own backward (benchmarks/train_throughput.py).

Both are used on CPU (`sparse_backward_on`); on other devices the ordinary autograd of the same forward runs
(a GPU's dense matmul is cheap and its sparse kernels are not measured here).
"""

from __future__ import annotations

import warnings

import torch


def sparse_backward_on(device: torch.device) -> bool:
    """Whether training on this device uses the sparse backward passes of this module."""
    return device.type == "cpu"


def transposed_sparse_product(rows: torch.Tensor, columns: torch.Tensor, values: torch.Tensor, x: torch.Tensor,
                              n_columns: int) -> torch.Tensor:
    """G^T @ x [n_columns, d] for the sparse G [batch, n_columns] with entries G[rows[i], columns[i]] = values[i]
    (flat [n] each; an entry may repeat, its values add) and x [batch, d]."""
    order = torch.argsort(columns, stable=True)
    counts = torch.bincount(columns, minlength=n_columns)
    crow = torch.zeros(n_columns + 1, dtype=torch.int64, device=x.device)
    crow[1:] = counts.cumsum(0)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": a stable path of it is used here
        warnings.simplefilter("ignore", UserWarning)
        transposed = torch.sparse_csr_tensor(crow, rows[order], values[order].to(x.dtype), (n_columns, x.shape[0]),
                                             check_invariants=False)
        return transposed @ x


class _SelectedEntries(torch.autograd.Function):
    """values = (x @ weight + bias)[rows, columns], given already computed; backward only at those entries."""

    @staticmethod
    def forward(ctx, values, x, weight, bias, rows, columns):
        ctx.save_for_backward(x, weight, rows, columns)
        ctx.n_features = weight.shape[1]
        return values.view_as(values)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rows, columns = ctx.saved_tensors
        flat_rows, flat_columns, flat_grad = rows.reshape(-1), columns.reshape(-1), grad.reshape(-1).to(x.dtype)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:  # G @ weight^T, the same product with the roles of rows and columns swapped
            grad_x = transposed_sparse_product(flat_columns, flat_rows, flat_grad, weight.T.to(x.dtype), x.shape[0])
        if ctx.needs_input_grad[2]:
            grad_weight = transposed_sparse_product(flat_rows, flat_columns, flat_grad, x, ctx.n_features).T
            grad_weight = grad_weight.to(weight.dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = torch.zeros(ctx.n_features, dtype=x.dtype, device=x.device).index_add_(0, flat_columns,
                                                                                               flat_grad)
        return None, grad_x, grad_weight, grad_bias, None, None


class _AllEntries(torch.autograd.Function):
    """pre = x @ weight + bias, given already computed; the ordinary dense backward."""

    @staticmethod
    def forward(ctx, pre, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return pre.view_as(pre)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors  # products in grad's dtype (bf16 under autocast, as autograd's would be)
        grad_x = (grad @ weight.to(grad.dtype).T).to(x.dtype) if ctx.needs_input_grad[1] else None
        grad_weight = (x.to(grad.dtype).T @ grad).to(weight.dtype) if ctx.needs_input_grad[2] else None
        grad_bias = grad.sum(dim=0, dtype=torch.float32).to(x.dtype) if ctx.needs_input_grad[3] else None
        return None, grad_x, grad_weight, grad_bias


class SelectablePreActivations:
    """Pre-activations x @ weight + bias of a batch, computed once without a graph (`pre`, [batch, d_sae]); the
    entries a loss uses are then taken with a gradient to x, weight and bias (`at`, or `dense` for all)."""

    def __init__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
        if x.dim() != 2:
            raise ValueError(f"SelectablePreActivations takes a batch [tokens, d_in], got shape {tuple(x.shape)}")
        self.x, self.weight, self.bias = x, weight, bias
        self._graph = None  # off CPU: the ordinary autograd graph of the dense pre-activations
        if sparse_backward_on(x.device):
            with torch.no_grad():
                self.pre = torch.addmm(bias, x, weight)  # under autocast in its dtype, as the dense forward was
        else:
            self._graph = torch.addmm(bias, x, weight)
            self.pre = self._graph.detach()

    def at(self, rows: torch.Tensor, columns: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        """pre[rows, columns] (any matching shapes) with a gradient computed at those entries alone. `values`:
        those entries when already gathered (e.g. by a topk of `pre`)."""
        if self._graph is not None:
            return self._graph[rows, columns]
        values = self.pre[rows, columns] if values is None else values
        return _SelectedEntries.apply(values, self.x, self.weight, self.bias, rows, columns)

    def at_tokens(self, columns: torch.Tensor) -> torch.Tensor:
        """`at` for a per-token selection: columns [batch, n] (e.g. topk indices) -> pre there [batch, n]."""
        return self.at(token_rows(columns), columns, self.pre.gather(1, columns))

    def dense(self) -> torch.Tensor:
        """All of `pre`, with the dense backward."""
        if self._graph is not None:
            return self._graph
        return _AllEntries.apply(self.pre, self.x, self.weight, self.bias)


class _SparseDecode(torch.autograd.Function):
    """[bags, d_in]: per token, the sum of values x weight rows `columns` (embedding_bag's layouts)."""

    @staticmethod
    def forward(ctx, values, weight, columns, offsets, rows, crow):
        ctx.save_for_backward(values, weight, columns, rows, crow)
        return torch.nn.functional.embedding_bag(columns, weight, offsets, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, grad):
        values, weight, columns, rows, crow = ctx.saved_tensors
        grad = grad.float()
        flat_columns = columns.reshape(-1)
        grad_values = grad_weight = None
        if ctx.needs_input_grad[0]:  # grad @ weight^T, at the active entries only
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                pattern = torch.sparse_csr_tensor(crow, flat_columns, torch.zeros(flat_columns.shape[0], device=grad.device),
                                                  (grad.shape[0], weight.shape[0]), check_invariants=False)
                sampled = torch.sparse.sampled_addmm(pattern, grad, weight.float().T, beta=0.0)
            grad_values = sampled.values().reshape(values.shape).to(values.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = transposed_sparse_product(rows, flat_columns, values.reshape(-1).float(), grad,
                                                    weight.shape[0]).to(weight.dtype)
        return grad_values, grad_weight, None, None, None, None


def sparse_decode(columns: torch.Tensor, weight: torch.Tensor, values: torch.Tensor,
                  offsets: torch.Tensor | None = None) -> torch.Tensor:
    """embedding_bag(columns, weight, offsets, per_sample_weights=values, mode="sum") [bags, d_in]: `columns` and
    `values` [bags, n], or flat [nnz] with `offsets` [bags] (each bag's start, ascending); on CPU with the
    sparse backward of this module."""
    if not sparse_backward_on(weight.device) or not torch.is_grad_enabled() or not (
            values.requires_grad or weight.requires_grad):
        return torch.nn.functional.embedding_bag(columns, weight, offsets, per_sample_weights=values, mode="sum")
    if offsets is None:  # [bags, n]: every bag holds n entries
        bags, per_bag = columns.shape
        crow = torch.arange(0, bags * per_bag + 1, per_bag, device=columns.device)
        rows = torch.arange(bags, device=columns.device).repeat_interleave(per_bag)
    else:
        crow = torch.cat([offsets, torch.tensor([columns.shape[0]], device=columns.device)])
        rows = torch.repeat_interleave(torch.arange(offsets.shape[0], device=columns.device), crow.diff())
    return _SparseDecode.apply(values, weight, columns, offsets, rows, crow)


def token_rows(indices: torch.Tensor) -> torch.Tensor:
    """[batch, n] -> the row index of every entry of a per-token selection (e.g. topk indices)."""
    return torch.arange(indices.shape[0], device=indices.device)[:, None].expand_as(indices)

"""One weighted, sum-pooled lookup of fbgemm's table-batched kernels, forward and backward, with and without
the gradient of the per-sample weights (`feature_requires_grad`, which TorchRec never passes).

    python bench/weighted_lookup.py --rows 2625 --dim 64 --bags 3000 --bag-size 256

The shape of an ML-100K batch's propagation rows (2,625 nodes, 256-entry rows). One process, one thread.
For the dense kernel (data-parallel tables) and the fused one (sharded tables, row-wise Adagrad) it prints
the mean ms of forward + backward, both ways, and whether the table gradient (dense) or the updated rows
(fused) are equal bit for bit: skipping the weights' gradient must change nothing else.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    DenseTableBatchedEmbeddingBagsCodegen,
    SplitTableBatchedEmbeddingBagsCodegen,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.cli import at_least  # noqa: E402  (needs the path above)


def ms_per_call(step, repeat: int) -> float:
    for _ in range(2):
        step()
    started = time.perf_counter()
    for _ in range(repeat):
        step()
    return (time.perf_counter() - started) / repeat * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=at_least(1), default=2625)
    parser.add_argument("--dim", type=at_least(1), default=64)
    parser.add_argument("--bags", type=at_least(1), default=3000)
    parser.add_argument("--bag-size", type=at_least(1), default=256)
    parser.add_argument("--repeat", type=at_least(1), default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    indices = torch.randint(0, args.rows, (args.bags * args.bag_size,), generator=generator)
    offsets = torch.arange(0, args.bags * args.bag_size + 1, args.bag_size)
    weights = torch.rand(args.bags * args.bag_size, generator=generator)
    grad_output = torch.randn(args.bags, args.dim, generator=generator)
    no_weight_grad = torch.zeros(1, dtype=torch.int32)

    def dense():
        return DenseTableBatchedEmbeddingBagsCodegen([(args.rows, args.dim)], pooling_mode=PoolingMode.SUM, use_cpu=True)

    def fused():
        torch.manual_seed(0)
        spec = [(args.rows, args.dim, EmbeddingLocation.HOST, ComputeDevice.CPU)]
        return SplitTableBatchedEmbeddingBagsCodegen(spec, optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, pooling_mode=PoolingMode.SUM)

    print(f"{args.bags} bags of {args.bag_size} rows over a {args.rows} x {args.dim} table, one thread")
    print("kernel        ms with weight grad   ms without   same table result")
    for name, make, result in (
        ("dense", dense, lambda m: m.weights.grad.clone()),
        ("fused", fused, lambda m: m.split_embedding_weights()[0].clone()),
    ):
        with_grad, without = make(), make()
        with_grad(indices, offsets, per_sample_weights=weights).backward(grad_output)
        without(indices, offsets, per_sample_weights=weights, feature_requires_grad=no_weight_grad).backward(grad_output)
        same = torch.equal(result(with_grad), result(without))
        slow = ms_per_call(lambda: with_grad(indices, offsets, per_sample_weights=weights).backward(grad_output), args.repeat)
        fast = ms_per_call(
            lambda: without(indices, offsets, per_sample_weights=weights, feature_requires_grad=no_weight_grad).backward(grad_output), args.repeat
        )
        print(f"{name:<13} {slow:>19.1f}   {fast:>11.1f}   {same}")


if __name__ == "__main__":
    main()

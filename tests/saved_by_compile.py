"""A torch.compile backend that records what the compiled forward graph saves for backward (shapes), for tests
that check what a compiled op keeps: AOT autograd with the min-cut partitioner Inductor uses, graphs run as
traced."""

from __future__ import annotations


def recording_backend() -> tuple[object, list[tuple[int, ...]]]:
    """(backend, shapes): ``shapes`` fills with the shape of each tensor a compiled forward saves."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    shapes: list[tuple[int, ...]] = []

    def forward_compiler(gm, _inputs):
        outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        shapes.extend(tuple(o.meta["val"].shape) for o in outputs[1:] if hasattr(o, "meta") and "val" in o.meta)
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=forward_compiler, bw_compiler=lambda gm, _: make_boxed_func(gm.forward),
                           partition_fn=min_cut_rematerialization_partition)
    return backend, shapes

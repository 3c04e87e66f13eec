"""Registration of an inference-only Triton op: its fake kernel, and an autograd formula that refuses."""

import torch


def register_inference_only(op_name: str, fake, public_name: str) -> None:
    """Registers fake for torch.ops.icnet.<op_name> and a backward that raises, naming the differentiable
    way to the same result (the public function with backend='reference')."""
    op = getattr(torch.ops.icnet, op_name).default
    torch.library.register_fake(op)(fake)

    def backward(ctx, grad):
        raise RuntimeError(f"icnet::{op_name} is inference-only and has no backward; train through "
                           f"icnet_kernels.{public_name}(..., backend='reference')")

    torch.library.register_autograd(op, backward, setup_context=lambda ctx, inputs, output: None)

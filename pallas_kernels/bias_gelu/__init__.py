"""GPT-2's MLP activation ``gelu_tanh(h + bias)`` whose backward is one pass: the gradient of the
pre-activation and the bias gradient (its sum over rows) from one read of the saved
pre-activation and the output gradient."""

from pallas_kernels.bias_gelu.api import IMPLEMENTATIONS, bias_gelu

__all__ = ["IMPLEMENTATIONS", "bias_gelu"]

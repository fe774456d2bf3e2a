"""(dtype, atol, rtol) triples: a kernel output against a float64 reference.

Half-precision outputs are rounded once at the end (fp32 accumulation), so the
error is about one ulp of the output: 2^-11 (fp16) and 2^-8 (bf16) relative,
with headroom for the p -> half cast before the PV product.
"""

import torch

TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 4e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
DTYPES = list(TOL)


def assert_close(actual, expected, dtype=None):
    """allclose at the dtype's tolerance; NaN never passes (assert_close refuses NaN)."""
    atol, rtol = TOL[dtype or actual.dtype]
    assert not torch.isnan(actual).any(), "NaN in output"
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=rtol)

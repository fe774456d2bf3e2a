"""benchmarks/sm90_sass.py: the Gluon kernel compiles for sm_90 on this CPU machine (ptxas included), and
the key-loop parser reads SASS."""

import os
import subprocess
import sys

import pytest

from benchmarks import sm90_sass
from draftopt.kernels.gluon import _sm90_kernel

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SASS = """
        /*0100*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0110*/                   MUFU.EX2 R5, R5 ;
        /*0120*/                   FADD R6, R5, R7 ;
        /*0130*/              @P0 BRA 0x100 ;
        /*0140*/                   MUFU.EX2 R5, R5 ;
        /*0150*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0160*/                   FADD R6, R5, R7 ;
        /*0170*/                   BRA 0x100 ;
"""


def test_loop_mix_takes_the_shortest_loop_with_products_and_a_softmax():
    n, mix = sm90_sass.loop_mix(SASS)
    assert n == 4 and mix.startswith("HGMMA 1, MUFU 1, FADD 1, BRA 1")
    assert sm90_sass.loop_mix("        /*0100*/                   FADD R6, R5, R7 ;") == (0, "-")


@pytest.mark.skipif(not _sm90_kernel.HAVE_GLUON, reason="this Triton has no Gluon")
def test_the_edge_and_fp8_variants_compile_for_sm90():
    """The in-place edge variant (bf16) and the FP8 one with its defaults (row sums by a product) compile
    without a spill or a serialized product. A subprocess: the CPU tests run Triton under TRITON_INTERPRET,
    which compiles nothing."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(REPO, "src"), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "sm90_sass.py"), "--variants", "edge",
                          "fp8", "--no-save"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    for variant, flags in (("edge", ("EDGE=1", "IN_PLACE=1")), ("fp8", ("FP8=1", "ROWSUM_MMA=1"))):
        (line,) = [ln for ln in res.stdout.splitlines() if ln.startswith(variant + " ")]
        assert all(f in line for f in flags), line
        cols = [t for t in line.split()[1:] if "=" not in t]  # after the variant and its constexprs
        regs, spills, serialized = int(cols[0]), int(cols[1]), cols[4]
        assert 0 < regs <= 255 and spills == 0, line  # a spill in the consumer would be a regression
        assert serialized == "no", line  # ptxas running the products synchronously would be one too

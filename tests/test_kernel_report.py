"""benchmarks/kernel_report.py: the SASS parser and the hot-loop counts, on a hand-written listing."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import kernel_report  # noqa: E402

# A kernel with a grid-stride loop (0x0020 .. 0x0070) that calls a 3-instruction subroutine, a small
# side loop, and the usual trailing self-branch; nvdisasm -c's layout.
LISTING = """
//--------------------- .text._Z4kernPf --------------------------
        .section        .text._Z4kernPf,"ax",@progbits
_Z4kernPf:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
.L_x_1:
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0030*/                   HMMA.16816.F32 R8, R4, R6, R8 ;
        /*0040*/                   CALL.REL.NOINC `($__internal_0_$__cuda_sm20_div_s64) ;
        /*0050*/                   MUFU.EX2 R9, R9 ;
        /*0060*/                   STG.E.U16 desc[UR4][R2.64], R9 ;
        /*0070*/               @P0 BRA `(.L_x_1) ;
        /*0080*/                   EXIT ;
$__internal_0_$__cuda_sm20_div_s64:
        /*0090*/                   IADD3 R0, R0, 0x1, RZ ;
        /*00a0*/                   IMAD.HI.U32 R0, R0, R0, RZ ;
        /*00b0*/                   RET.REL.NODEC R20 `(_Z4kernPf) ;
.L_x_2:
        /*00c0*/                   BRA `(.L_x_2) ;
        /*00d0*/                   NOP ;
"""


def test_parse_and_hot_loop():
    functions = kernel_report.parse_sass(LISTING)
    assert list(functions) == ["_Z4kernPf"]
    stats = kernel_report.sass_stats(functions["_Z4kernPf"], elements=2)
    assert stats["loop"] and stats["instructions"] == 13  # the NOP dropped
    # 6 loop instructions + the 3 of the subroutine it calls; per element over 2 elements.
    assert stats["hot_instructions"] == 9 and stats["per_element"] == 4.5
    assert stats["ops"] == {"CALL": 1, "HMMA": 1, "MUFU": 1, "LDG.128": 1, "STG.U16": 1}


def test_whole_kernel_when_asked():
    stats = kernel_report.sass_stats(kernel_report.parse_sass(LISTING)["_Z4kernPf"], elements=1, whole=True)
    # Everything up to the last EXIT, plus the subroutine once: 9 + 3.
    assert not stats["loop"] and stats["hot_instructions"] == 12


def test_cuda_elements_from_names():
    assert kernel_report._cuda_elements("p_step_contiguous<Half, true>", "") == (8, False, None)
    assert kernel_report._cuda_elements("q_sample_channels_last<float>", "") == (1, False, None)
    assert kernel_report._cuda_elements("q_sample_channels_last<float>", '#include "ddpm_fast/channels_last.h"') == \
        (4, False, None)
    # GroupNorm walks: counted from the unrolled loop's data accesses.
    count, whole, access = kernel_report._cuda_elements("gn_stats<float, true, 4>", "")
    assert count({"LDG.128": 2, "LDG.32": 5}) == 8 and not whole and access == "LDG.128"
    assert kernel_report._cuda_elements("gn_norm<Half, false, 1>", "")[0]({"STG.U16": 4, "STG.32": 1}) == 4
    assert kernel_report._cuda_elements("gnb_sums<BFloat16, true, 8>", "")[0]({"LDG.128": 4}) == 16
    assert kernel_report._cuda_elements("gn_stats<float, false, 1>", "") == (None, False, "LDG.32")
    assert kernel_report._cuda_elements("gn_onchip<BFloat16, false, 8>", "") == (16, True, None)
    assert kernel_report._cuda_elements("flash_fwd<Fp16, 64>", "") == (None, False, None)


def test_hot_loop_marked_by_its_data_access():
    """A wider loop of fp32 partial-sum loads before the walk: the walk, which stores 16 bytes, is hot."""
    listing = """
//--------------------- .text._Z4walkPf --------------------------
_Z4walkPf:
.L_x_1:
        /*0000*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*0010*/                   LDG.E R5, desc[UR4][R2.64+0x4] ;
        /*0020*/                   LDG.E R6, desc[UR4][R2.64+0x8] ;
        /*0030*/                   FADD R7, R4, R5 ;
        /*0040*/               @P0 BRA `(.L_x_1) ;
.L_x_2:
        /*0050*/                   LDG.E.128 R8, desc[UR4][R2.64] ;
        /*0060*/                   STG.E.128 desc[UR4][R2.64], R8 ;
        /*0070*/               @P0 BRA `(.L_x_2) ;
        /*0080*/                   EXIT ;
"""
    insns = kernel_report.parse_sass(listing)["_Z4walkPf"]
    assert kernel_report.sass_stats(insns, None)["hot_instructions"] == 5
    walk = kernel_report.sass_stats(insns, lambda ops: 4 * ops["STG.128"], access="STG.128")
    assert walk["hot_instructions"] == 3 and walk["per_element"] == 0.8

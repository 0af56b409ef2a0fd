"""The code tables equal bitsandbytes' bit for bit."""

import numpy as np
import pytest

from lowbit_jax import formats


def _bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


@pytest.mark.parametrize(
    "signed,max_exponent_bits,total_bits",
    [(True, 7, 8), (False, 7, 8), (True, 4, 8), (True, 5, 8), (True, 3, 4)],
)
def test_dynamic_map_matches_bnb(bnbF, signed, max_exponent_bits, total_bits):
    ref = bnbF.create_dynamic_map(signed, max_exponent_bits, total_bits).numpy()
    ours = formats.create_dynamic_map(signed, max_exponent_bits, total_bits)
    np.testing.assert_array_equal(_bits(ours), _bits(ref))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("total_bits", [8, 4])
def test_linear_map_matches_bnb(bnbF, signed, total_bits):
    np.testing.assert_array_equal(
        _bits(formats.create_linear_map(signed, total_bits)), _bits(bnbF.create_linear_map(signed, total_bits).numpy())
    )


@pytest.mark.parametrize("use_extra_value", [True, False])
def test_normal_map_matches_bnb(bnbF, use_extra_value):
    np.testing.assert_array_equal(
        _bits(formats.create_normal_map(use_extra_value=use_extra_value)),
        _bits(bnbF.create_normal_map(use_extra_value=use_extra_value).numpy()),
    )


@pytest.mark.parametrize("args", [(True, 5, 2, 8), (True, 4, 3, 8), (False, 4, 4, 8), (True, 2, 1, 4)])
def test_fp8_map_matches_bnb(bnbF, args):
    np.testing.assert_array_equal(_bits(formats.create_fp8_map(*args)), _bits(bnbF.create_fp8_map(*args).numpy()))


def test_4bit_codes_match_bnb(bnbF):
    np.testing.assert_array_equal(_bits(formats.NF4_CODE), _bits(bnbF.get_4bit_type("nf4", device="cpu").numpy()))
    np.testing.assert_array_equal(_bits(formats.FP4_CODE), _bits(bnbF.get_4bit_type("fp4", device="cpu").numpy()))
    # The NF4 table is also the normal map's 16 non-zero-padding values.
    normal = formats.create_normal_map()
    np.testing.assert_allclose(formats.NF4_CODE, np.unique(normal), rtol=0, atol=0)


def test_fp4_sort_order_matches_bnb(torch, bnbF):
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    _, order = _get_4bit_quantize_bounds("fp4", torch.device("cpu"))
    np.testing.assert_array_equal(formats.FP4_SORT_ORDER, order.numpy())


def test_design_doc_values():
    # DESIGN.md's tables, independently of bitsandbytes.
    np.testing.assert_allclose(
        formats.FP4_CODE[:8], [0, 0.0052083, 0.6666667, 1, 0.3333333, 0.5, 0.1666667, 0.25], atol=1e-7
    )
    np.testing.assert_allclose(formats.FP4_CODE[8:], -formats.FP4_CODE[:8], atol=0)
    assert formats.NF4_CODE[0] == -1 and formats.NF4_CODE[7] == 0 and formats.NF4_CODE[15] == 1


def test_bad_quant_type():
    with pytest.raises(ValueError, match="quant_type"):
        formats.get_4bit_code("int3")

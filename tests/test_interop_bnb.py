"""bitsandbytes-format import/export against the real bitsandbytes 0.50.2 on the CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lowbit_jax import quant as Q
from lowbit_jax.convert import bnb_format as B
from lowbit_jax.convert.safety import CheckpointError
from lowbit_jax.ops import matmul_4bit, matmul_int8


@pytest.fixture(scope="module")
def bnb(bnbF):
    import bitsandbytes

    return bitsandbytes


def _torch_sd(torch, sd):
    return {k: (torch.from_numpy(np.array(v)) if v.ndim else torch.tensor(v.item(), dtype=torch.uint8)) for k, v in sd.items()}


# Layer shapes keep in_features a multiple of the blocksize: bitsandbytes 0.50.2's CPU C
# dequantize uses the wrong absmax when a block spans rows (see test_quant_parity), and a layer
# output comparison would measure that bug, not our import.


def _linear4bit(torch, bnb, w, b, quant_type, dq):
    lin = torch.nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w))
        lin.bias.copy_(torch.from_numpy(b))
    layer = bnb.nn.Linear4bit(w.shape[1], w.shape[0], compute_dtype=torch.float32, compress_statistics=dq,
                              quant_type=quant_type)  # fmt: skip
    layer.load_state_dict(lin.state_dict())
    return layer.to("cpu")  # quantizes


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [False, True])
def test_linear4bit_state_dict_imports_bit_exact_and_same_outputs(torch, bnb, rng, quant_type, dq):
    w = rng.standard_normal((48, 192)).astype(np.float32)
    b = rng.standard_normal(48).astype(np.float32)
    layer = _linear4bit(torch, bnb, w, b, quant_type, dq)
    sd = {f"proj.{k}": v for k, v in layer.state_dict().items()}
    tree = B.import_bnb_state_dict(sd)
    q = tree["proj.weight"]
    assert isinstance(q, Q.Packed4bit) and q.shape == (48, 192) and q.quant_type == quant_type
    assert q.double_quant == dq
    ours = Q.quantize_4bit(w, 64, quant_type, dq)
    np.testing.assert_array_equal(np.asarray(q.packed), np.asarray(ours.packed))
    np.testing.assert_array_equal(np.asarray(q.absmax), np.asarray(ours.absmax))
    if dq:
        np.testing.assert_array_equal(np.asarray(q.nested_absmax), np.asarray(ours.nested_absmax))
        assert np.float32(q.offset) == np.float32(ours.offset)
    np.testing.assert_array_equal(tree["proj.bias"], b)

    x = rng.standard_normal((5, 192)).astype(np.float32)
    ref = layer(torch.from_numpy(x)).detach().numpy()
    got = np.asarray(matmul_4bit(x, q, bias=tree["proj.bias"]))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("quant_type,dq", [("nf4", True), ("fp4", False)])
def test_export_is_byte_identical_and_loads_into_linear4bit(torch, bnb, rng, quant_type, dq):
    w = rng.standard_normal((40, 128)).astype(np.float32)
    b = rng.standard_normal(40).astype(np.float32)
    q = Q.quantize_4bit(w, 64, quant_type, dq)
    sd = B.export_bnb_state_dict({"weight": q, "bias": b})
    # exactly the keys, dtypes, shapes and JSON bytes bitsandbytes writes for the same layer
    ref_sd = _linear4bit(torch, bnb, w, b, quant_type, dq).state_dict()
    assert set(sd) == set(ref_sd)
    for k, v in ref_sd.items():
        assert sd[k].dtype == v.numpy().dtype and sd[k].shape == tuple(v.shape), k
        np.testing.assert_array_equal(sd[k], v.numpy(), err_msg=k)

    # load into a fresh Linear4bit the way transformers does, and run it
    layer = bnb.nn.Linear4bit(128, 40, compute_dtype=torch.float32, quant_type=quant_type)
    tsd = _torch_sd(torch, sd)
    stats = {k[len("weight."):]: v for k, v in tsd.items() if k.startswith("weight.")}
    layer.weight = bnb.nn.Params4bit.from_prequantized(tsd["weight"], stats, device="cpu", module=layer)
    layer.bias = torch.nn.Parameter(tsd["bias"])
    x = rng.standard_normal((3, 128)).astype(np.float32)
    got = layer(torch.from_numpy(x)).detach().numpy()
    want = np.asarray(matmul_4bit(x, q, bias=b))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_quant_state_as_dict_packed_from_functional(torch, bnbF, rng):
    w = rng.standard_normal((33, 70)).astype(np.float32)  # odd sizes: partial last block
    packed, qs = bnbF.quantize_4bit(torch.from_numpy(w), blocksize=128, quant_type="nf4", compress_statistics=True)
    sd = {"w": packed, **{f"w.{k}": v for k, v in qs.as_dict(packed=True).items()}}
    q = B.import_bnb_state_dict(sd)["w"]
    ours = Q.quantize_4bit(w, 128, "nf4", True)
    np.testing.assert_array_equal(np.asarray(q.packed), np.asarray(ours.packed))
    np.testing.assert_array_equal(np.asarray(q.absmax), np.asarray(ours.absmax))
    assert q.shape == (33, 70) and q.blocksize == 128 and q.nested_blocksize == 256


def test_bfloat16_layer_round_trip(torch, bnb, rng):
    w = rng.standard_normal((32, 64)).astype(np.float32)
    wt = torch.from_numpy(w).to(torch.bfloat16)
    packed, qs = bnb.functional.quantize_4bit(wt, blocksize=64, quant_type="nf4")
    sd = {"m.weight": packed, **{f"m.weight.{k}": v for k, v in qs.as_dict(packed=True).items()}}
    q = B.import_bnb_state_dict(sd)["m.weight"]
    assert q.dtype == "bfloat16"
    out = B.export_bnb_state_dict({"m.weight": q})
    assert json.loads(bytes(out["m.weight.quant_state.bitsandbytes__nf4"]))["dtype"] == "bfloat16"
    np.testing.assert_array_equal(out["m.weight"], packed.numpy())


def test_linear8bitlt_import_export(torch, bnb, rng):
    w = rng.standard_normal((24, 80)).astype(np.float32)
    b = rng.standard_normal(24).astype(np.float32)
    lin = torch.nn.Linear(80, 24)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w))
        lin.bias.copy_(torch.from_numpy(b))
    layer = bnb.nn.Linear8bitLt(80, 24, has_fp16_weights=False, threshold=6.0)
    layer.load_state_dict(lin.state_dict())
    layer = layer.to("cpu")
    sd = layer.state_dict()
    tree = B.import_bnb_state_dict(sd, int8_dtype="float32")
    q = tree["weight"]
    assert isinstance(q, Q.RowwiseInt8)
    ours = Q.quantize_int8(w.astype(np.float16))  # Int8Params quantizes the fp16 copy of the weight
    np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(ours.codes))
    np.testing.assert_array_equal(np.asarray(q.row_absmax), np.asarray(ours.row_absmax))

    x = rng.standard_normal((4, 80)).astype(np.float32)
    x[:, 3] *= 10  # an outlier column
    ref = layer(torch.from_numpy(x)).detach().numpy()
    got = np.asarray(matmul_int8(x, q, threshold=6.0, bias=tree["bias"]))
    # bitsandbytes' CPU path and ours round the activations differently (int8 row-wise vs its
    # fallback), so outputs agree to the int8 activation error, ~0.5% of the output norm.
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-2

    out = B.export_bnb_state_dict(tree)
    assert set(out) == set(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(out[k], v.numpy(), err_msg=k)
    fresh = bnb.nn.Linear8bitLt(80, 24, has_fp16_weights=False, threshold=6.0).to("cpu")  # bnb: quantize first
    fresh.load_state_dict(_torch_sd(torch, out))
    np.testing.assert_array_equal(fresh(torch.from_numpy(x)).detach().numpy(), ref)


def test_checkpoint_file_round_trip_via_safetensors(torch, bnb, rng, tmp_path):
    from safetensors.torch import load_file

    w = rng.standard_normal((32, 64)).astype(np.float32)
    tree = {"a.weight": Q.quantize_4bit(w, 64, "nf4", True), "b.weight": Q.quantize_int8(w),
            "b.bias": rng.standard_normal(32).astype(np.float32)}  # fmt: skip
    qc = B.bnb_quantization_config(quant_type="nf4", double_quant=True)
    out = B.save_bnb_checkpoint(tmp_path / "ckpt", tree, config={"model_type": "llama"}, quantization_config=qc)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bnb_4bit_use_double_quant"] is True
    # torch's own safetensors reader accepts our file
    tsd = load_file(str(out / "model.safetensors"))
    assert tsd["a.weight"].dtype == torch.uint8 and tsd["b.weight"].dtype == torch.int8
    back = B.load_bnb_checkpoint(out, int8_dtype="float32")
    for k in ("packed", "absmax", "nested_absmax", "offset"):
        np.testing.assert_array_equal(np.asarray(getattr(back["a.weight"], k)), np.asarray(getattr(tree["a.weight"], k)))
    np.testing.assert_array_equal(np.asarray(back["b.weight"].codes), np.asarray(tree["b.weight"].codes))
    with pytest.raises(FileExistsError):
        B.save_bnb_checkpoint(tmp_path / "ckpt", tree)


def test_import_rejects_inconsistent_entries(torch, bnb, rng):
    w = rng.standard_normal((16, 64)).astype(np.float32)
    sd = B.export_bnb_state_dict({"w": Q.quantize_4bit(w, 64, "nf4", True)})
    bad = dict(sd, **{"w.quant_map": sd["w.quant_map"] * 2})
    with pytest.raises(CheckpointError, match="quant_map"):
        B.import_bnb_state_dict(bad)
    bad = dict(sd, **{"w": sd["w"][:-1]})
    with pytest.raises(CheckpointError, match="packed weight holds"):
        B.import_bnb_state_dict(bad)
    qs = json.loads(bytes(sd["w.quant_state.bitsandbytes__nf4"]))
    qs["shape"] = [16, 1 << 40]
    bad = dict(sd, **{"w.quant_state.bitsandbytes__nf4": np.frombuffer(json.dumps(qs).encode(), np.uint8)})
    with pytest.raises(CheckpointError):
        B.import_bnb_state_dict(bad)
    bad = dict(sd, **{"w.quant_state.bitsandbytes__nf4": np.frombuffer(b"{not json", np.uint8)})
    with pytest.raises(CheckpointError, match="JSON"):
        B.import_bnb_state_dict(bad)
    sd8 = B.export_bnb_state_dict({"l.weight": Q.quantize_int8(w)})
    with pytest.raises(CheckpointError, match="col32"):
        B.import_bnb_state_dict(dict(sd8, **{"l.weight_format": np.asarray(1, np.uint8)}))

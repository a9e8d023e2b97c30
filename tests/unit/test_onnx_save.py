"""An ONNX model whose weights protobuf cannot hold in one message (over 2 GiB) is written with its
weights beside it, and onnxruntime runs it as the one-file model."""
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from medsapiens.deploy.export import save_onnx


def matmul_model(weight: np.ndarray):
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, weight.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, weight.shape[1]])],
        [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_weights_go_beside_the_model_when_asked_and_an_earlier_exports_are_removed(tmp_path):
    weight = np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32)
    x = np.ones((1, 64), np.float32)
    out = tmp_path / "m.onnx"
    save_onnx(matmul_model(weight), out, external=True)
    data = tmp_path / "m.onnx.data"
    assert data.stat().st_size >= weight.nbytes and out.stat().st_size < weight.nbytes
    np.testing.assert_allclose(run(out, x), x @ weight, rtol=1e-5)
    save_onnx(matmul_model(weight), out, external=False)  # a smaller model over the same path: one file again
    assert not data.exists() and out.stat().st_size > weight.nbytes
    np.testing.assert_allclose(run(out, x), x @ weight, rtol=1e-5)


def test_an_export_never_replaces_a_file_unasked(tmp_path, capsys):
    from medsapiens.launch.cli import main

    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    earlier = tmp_path / "m.onnx"
    earlier.write_bytes(b"an earlier export")
    (tmp_path / "folder.onnx").mkdir()
    for out, message in ((notes, "name the file MODEL.onnx"), (earlier, "exists; pass --force to replace it"),
                         (tmp_path / "folder.onnx", "is a folder")):
        assert main(["export", "onnx", str(tmp_path / "no-bundle"), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--out {out}" in err and message in err, err
    assert notes.read_text() == "my notes" and earlier.read_bytes() == b"an earlier export"
    assert main(["export", "onnx", str(tmp_path / "no-bundle"), "--out", str(earlier), "--force"]) == 2
    assert "no-bundle is not a bundle" in capsys.readouterr().err  # past the check: --force lets it replace the file


def test_the_exported_decoding_gives_nan_for_a_map_holding_nan_or_infinity_as_torch_does():
    """onnxruntime's max skips NaN where torch's returns it: the decoding checks the maps themselves."""
    import warnings

    import torch

    from medsapiens.data.codec import decode_udp
    from medsapiens.deploy.export import OPSET

    class Decode(torch.nn.Module):
        def forward(self, heatmaps):
            return decode_udp(heatmaps)[0]

    heat = torch.zeros(1, 4, 16, 12)
    heat[..., 5, 6] = 1.0
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(Decode(), (heat,), input_names=["heatmaps"], opset_version=OPSET, dynamo=True,
                                    verbose=False, optimize=True)
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    heat[0, 0, 2, 2], heat[0, 1, 3, 3], heat[0, 2, 9, 9] = float("nan"), float("inf"), float("-inf")
    decoded = session.run(None, {"heatmaps": heat.numpy()})[0]
    np.testing.assert_array_equal(np.isnan(decoded).all(-1), [[True, True, True, False]])
    np.testing.assert_allclose(decoded[0, 3], decode_udp(heat)[0][0, 3].numpy(), atol=1e-5)

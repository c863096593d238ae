"""Converter stages in a child process: the TFLite converter and tf2onnx are
large C++ programs that can crash (a segfault on an LSTM with a fixed batch of
one), and a crash must be one line that names the stage, not a dead
``edgeship`` with its work folders left behind.

The parent writes the request (a JSON file) and the calibration arrays (one
``.npy`` per input, memory-mapped by the child, so calibration streams from disk
instead of holding a second copy) into its private work folder, starts
``python -m edgeship.converters.isolated REQUEST``, reads progress lines from a
pipe, and turns the child's result file (or its death) into a return value or
one of edgeship's errors. Everything lives in the work folder the caller
deletes, whatever happens.
"""

from __future__ import annotations

__all__ = ["StageCrashedError", "crash_message", "run_stage"]

import json
import os
import resource
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.ota.errors import BadInputError, EdgeshipError, GateFailedError, MissingExtraError

from .data import Dataset
from .progress import ProgressCallback, no_progress
from .quiet import QUIET_ENV, is_verbose, user_stderr

STAGE_TIMEOUT_S = 3600
_ERRORS: dict[str, type[EdgeshipError]] = {
    "BadInputError": BadInputError,
    "ModelLoadError": BadInputError,
    "GateFailedError": GateFailedError,
    "MissingExtraError": MissingExtraError,
    "EdgeshipError": EdgeshipError,
}


class StageCrashedError(EdgeshipError):
    """A converter's child process died (a signal, or an exit without a result)."""


def crash_message(stage: str, returncode: int, model: str) -> str:
    """The one line a crash becomes (pure)."""
    if returncode < 0:
        try:
            how = f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"signal {-returncode}"
    else:
        how = f"exit {returncode}" + (f", signal {signal.Signals(returncode - 128).name}" if 128 < returncode < 160 else "")
    return (
        f"the {stage} crashed ({how}) on {model}; nothing was written "
        "(rerun with --verbose to see the converter's own output)"
    )


def save_dataset(data: Dataset, folder: Path) -> dict[str, Any]:
    """The dataset's arrays as .npy files in ``folder``; the description the child loads them from."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, array in enumerate(data.inputs):
        path = folder / f"input_{i}.npy"
        np.save(path, np.ascontiguousarray(array))
        files.append(path.name)
    return {"folder": str(folder), "names": list(data.names), "files": files, "source": data.source}


def load_dataset_files(described: dict[str, Any]) -> Dataset:
    """The child's side of ``save_dataset``: memory-mapped, read as calibration asks."""
    folder = Path(described["folder"])
    arrays = tuple(np.load(folder / name, mmap_mode="r", allow_pickle=False) for name in described["files"])
    return Dataset(arrays, None, str(described["source"]), names=tuple(described["names"]))


def run_stage(
    stage: str,
    request: dict[str, Any],
    work: Path,
    *,
    model_name: str,
    progress: ProgressCallback | None = None,
    timeout_s: float = STAGE_TIMEOUT_S,
) -> dict[str, Any]:
    """Run ``request`` (see ``_STAGES``) in a child; its result dict, or the error it raised.

    Raises:
        StageCrashedError: the child died without a result (one line naming ``stage``).
        EdgeshipError and subclasses: what the child raised, re-raised here.
    """
    report = progress or no_progress
    work.mkdir(parents=True, exist_ok=True)
    request_file = work / "request.json"
    result_file = work / "result.json"
    result_file.unlink(missing_ok=True)
    request_file.write_text(json.dumps({**request, "result_file": str(result_file)}))
    read_end, write_end = os.pipe()
    env = dict(os.environ)
    verbose = is_verbose()
    if not verbose:
        env.update(QUIET_ENV)
    log = open(work / "child.log", "wb")  # closed below
    try:
        out_target: Any = log
        if verbose:
            out_target = user_stderr()
        child = subprocess.Popen(
            [sys.executable, "-m", "edgeship.converters.isolated", str(request_file), str(write_end)],
            stdin=subprocess.DEVNULL,
            stdout=out_target,
            stderr=out_target,
            pass_fds=(write_end,),
            env=env,
        )
    except OSError as exc:
        log.close()
        os.close(read_end)
        os.close(write_end)
        raise EdgeshipError(f"cannot start the {stage}: {exc.strerror or exc}") from None
    os.close(write_end)
    reader = threading.Thread(target=_relay_progress, args=(read_end, report), daemon=True)
    reader.start()
    try:
        returncode = child.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        raise StageCrashedError(f"the {stage} took longer than {timeout_s:.0f} s on {model_name} and was stopped; nothing was written") from None
    except BaseException:  # Ctrl-C: the child must not outlive us
        child.kill()
        child.wait()
        raise
    finally:
        reader.join(timeout=5)
        log.close()
    if not result_file.is_file():
        raise StageCrashedError(crash_message(stage, returncode, model_name))
    outcome = json.loads(result_file.read_text())
    if "error" in outcome:
        error = _ERRORS.get(outcome["error"]["class"], EdgeshipError)
        raise error(outcome["error"]["message"])
    return dict(outcome["result"])


def _relay_progress(fd: int, report: ProgressCallback) -> None:
    with os.fdopen(fd, "r", encoding="utf-8", errors="replace") as lines:
        for line in lines:
            parts = line.rstrip("\n").split("\t")
            if len(parts) == 3:
                try:
                    report(parts[0], int(parts[1]), int(parts[2]))
                except Exception:  # noqa: BLE001, S110 - a display problem must not stop the conversion
                    pass


# --- the child ---------------------------------------------------------------


def _progress_pipe(fd: int) -> ProgressCallback:
    stream = os.fdopen(fd, "w", buffering=1, encoding="utf-8")

    def report(description: str, completed: int, total: int) -> None:
        try:
            stream.write(f"{description}\t{completed}\t{total}\n")
        except (OSError, ValueError):
            pass

    return report


def _stage_tflite(request: dict[str, Any], progress: ProgressCallback) -> dict[str, Any]:
    from .sources import load_keras_or_savedmodel
    from .to_tflite import TFLiteOptions, convert_to_tflite

    source = Path(request["source"])
    loaded = load_keras_or_savedmodel(source, request["kind"])
    calibration = load_dataset_files(request["calibration"]) if request.get("calibration") else None
    options = TFLiteOptions(**request["options"])
    conversion = convert_to_tflite(loaded, request["kind"], source, options=options, calibration=calibration, progress=progress)
    Path(request["out"]).write_bytes(conversion.content)
    return {"calibration_samples": conversion.calibration_samples, "notes": list(conversion.notes)}


def _stage_onnx_export(request: dict[str, Any], progress: ProgressCallback) -> dict[str, Any]:
    from .sources import load_keras_or_savedmodel
    from .to_onnx import export_to_onnx

    source = Path(request["source"])
    loaded = load_keras_or_savedmodel(source, request["kind"])
    progress("exporting to ONNX", 0, 1)
    notes = export_to_onnx(loaded, request["kind"], source, Path(request["out"]), opset=int(request["opset"]))
    progress("exporting to ONNX", 1, 1)
    return {"notes": list(notes)}


def _stage_onnx_quantize(request: dict[str, Any], progress: ProgressCallback) -> dict[str, Any]:
    from .onnx_quantize import OnnxQuantOptions, quantize_onnx

    calibration = load_dataset_files(request["calibration"]) if request.get("calibration") else None
    result = quantize_onnx(
        Path(request["src"]), Path(request["out"]), options=OnnxQuantOptions(**request["options"]),
        calibration=calibration, progress=progress, model_name=request["model_name"],
        cache=Path(request["cache"]) if request.get("cache") else None,
    )
    return result


def _stage_sklearn(request: dict[str, Any], progress: ProgressCallback) -> dict[str, Any]:
    from .from_sklearn import export_sklearn_to_onnx

    progress("exporting to ONNX", 0, 1)
    notes = export_sklearn_to_onnx(Path(request["source"]), Path(request["out"]), trust_pickle=bool(request["trust_pickle"]))
    progress("exporting to ONNX", 1, 1)
    return {"notes": list(notes)}


def _stage_tflite_doctor(request: dict[str, Any], progress: ProgressCallback) -> dict[str, Any]:
    from .sources import load_keras_or_savedmodel
    from .to_tflite import TFLiteOptions, tflite_layer_statistics

    source = Path(request["source"])
    loaded = load_keras_or_savedmodel(source, request["kind"])
    ranking = tflite_layer_statistics(
        loaded, request["kind"], source, options=TFLiteOptions(**request["options"]),
        calibration=load_dataset_files(request["calibration"]), data=load_dataset_files(request["data"]), progress=progress,
    )
    return {"ranking": ranking}


def _stage_crash_for_tests(request: dict[str, Any], progress: ProgressCallback) -> dict[str, Any]:
    """A stage that dies the way a converter does (tests prove the parent copes)."""
    progress("crashing", 0, 1)
    os.kill(os.getpid(), signal.SIGSEGV)
    return {}  # pragma: no cover


_STAGES: dict[str, Callable[[dict[str, Any], ProgressCallback], dict[str, Any]]] = {
    "tflite": _stage_tflite,
    "onnx-export": _stage_onnx_export,
    "onnx-quantize": _stage_onnx_quantize,
    "sklearn-export": _stage_sklearn,
    "tflite-doctor": _stage_tflite_doctor,
    "crash": _stage_crash_for_tests,
}


def _child_main(argv: list[str]) -> int:
    request_file, fd = argv
    request = json.loads(Path(request_file).read_text())
    progress = _progress_pipe(int(fd))
    result_file = Path(request["result_file"])
    try:
        from .sources import stdout_to_stderr

        with stdout_to_stderr():
            result = _STAGES[request["stage"]](request, progress)
        result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        outcome: dict[str, Any] = {"result": result}
    except EdgeshipError as exc:
        outcome = {"error": {"class": type(exc).__name__, "message": exc.message}}
    except MemoryError:
        outcome = {"error": {"class": "EdgeshipError", "message": "the converter ran out of memory"}}
    except Exception as exc:  # noqa: BLE001 - a converter's own exception: one line, exit 1 at the CLI
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), exc.__class__.__name__)
        outcome = {"error": {"class": "EdgeshipError", "message": f"{request.get('stage_name', request['stage'])} failed: {first[:300]}"}}
    tmp = result_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(outcome))
    os.replace(tmp, result_file)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))

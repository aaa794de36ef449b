"""Loads, versions, labels, hot-reloads and unloads SavedModels the way TF Serving does.

One `ModelManager` serves the models of a `ModelServerConfig` (tensorflow_serving.config):
* Numeric sub-folders of a model's base path are its versions (other names are ignored).
* The version policy picks which versions to serve: `latest { num_versions: N }` (default
  N = 1), `specific { versions: ... }` or `all {}`.
* A poll thread re-lists the base paths every `poll_wait_seconds` (gfile: local or gs://) and
  loads new versions in the background; a version is only published once it loaded and its
  warmup requests (assets.extra/tf_serving_warmup_requests) replayed without error, and old
  versions are unloaded only afterwards, so requests never see a gap.
* A version that fails to load is recorded (state END with the error, visible through
  GetModelStatus), logged, and skipped by the policy: the latest *working* versions stay in
  service. The policy then picks the next older version within the same poll, so a restart
  (after kill -9, say) next to several broken newer versions serves the newest loadable one
  after one poll, not one broken version per poll; while nothing is served, the next older
  candidate loads alongside the newest, so a newest version that fails only after a full load
  does not delay service by one more load. A failed version is retried when any of its
  files changes (its list of files with their sizes and modification times).
* Requests take a reference on the version they run on (`acquire`), so unloading never fails a
  request in flight; a version's batchers are closed after its last request finished.
* `version_labels` map names (stable, canary) to versions and are resolved per request.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
from tensorflow_serving.apis import get_model_status_pb2

from common import tf_serving_protocol as P
from serving.model_server import errors
from serving.model_server.batching import Batcher, BatchingOptions

log = logging.getLogger(__name__)

# The states GetModelStatus reports (tensorflow.serving.ModelVersionStatus.State).
_State = get_model_status_pb2.ModelVersionStatus.State
START, LOADING, AVAILABLE, UNLOADING, END = (_State.START, _State.LOADING, _State.AVAILABLE,
                                             _State.UNLOADING, _State.END)


@dataclasses.dataclass
class VersionStatus:
    state: int
    error_code: int = 0  # google.rpc / grpc numeric code, 0 = OK
    error_message: str = ""


@dataclasses.dataclass
class InputSpec:
    """One input of a signature as declared in its SignatureDef (dtype facts cached: requests
    are checked against them on every call)."""

    key: str
    dtype_enum: int  # tensorflow.DataType
    np_dtype: np.dtype
    shape: Optional[Tuple[int, ...]]  # None = unknown rank; -1 = unknown dimension
    dtype_name: str = ""  # TensorFlow's name of the dtype: float32, int64, string, ...

    def __post_init__(self):
        if not self.dtype_name:
            import tensorflow as tf

            self.dtype_name = tf.dtypes.as_dtype(self.dtype_enum).name

    def describe(self) -> str:
        dims = "unknown rank" if self.shape is None else \
            "[" + ", ".join("?" if d < 0 else str(d) for d in self.shape) + "]"
        return f"{self.dtype_name} {dims}"


class Signature:
    """A callable signature of a loaded version, with its SignatureDef and optional batcher.

    Requests reach `_call` already checked against the SignatureDef (dtypes exactly, shapes
    with their unknown dimensions), so the concrete function is called with its flat list of
    inputs, skipping the structured-signature binding and re-validation that
    `function(**kwargs)` repeats on every call (~0.7 ms of a 5 ms listwise request). That entry
    (`_call_flat`) is TensorFlow's own but not public: when a function lacks it, takes inputs
    the SignatureDef does not name, or answers in another form, the keyword call is used.
    """

    def __init__(self, name: str, signature_def, function, batching: Optional[BatchingOptions],
                 label: str):
        import tensorflow as tf

        self.name = name
        self.signature_def = signature_def
        self.function = function
        self.inputs: Dict[str, InputSpec] = {}
        for key, info in signature_def.inputs.items():
            shape = None if info.tensor_shape.unknown_rank else \
                tuple(int(d.size) for d in info.tensor_shape.dim)
            self.inputs[key] = InputSpec(key, info.dtype,
                                         np.dtype(tf.dtypes.as_dtype(info.dtype).as_numpy_dtype),
                                         shape)
        self.output_keys = sorted(signature_def.outputs.keys())
        self._tf_dtypes = {k: tf.dtypes.as_dtype(spec.dtype_enum)
                           for k, spec in self.inputs.items()}
        self._flat_order = self._flat_input_order(function)
        self.executions = 0  # graph executions (a merged batch counts once)
        self._lock = threading.Lock()
        self.batcher = Batcher(self._call, batching, name=f"batch-{label}-{name}") \
            if batching is not None else None

    def _flat_input_order(self, function) -> Optional[List[str]]:
        """Input names in the order the function takes them flat; None = call by keyword."""
        try:
            names = [p.name for p in function.function_type.parameters.values()]
            function._call_flat, function.captured_inputs  # noqa: B018 (present?)
        except AttributeError:
            return None
        return names if sorted(names) == sorted(self.inputs) else None

    def _call(self, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        import tensorflow as tf

        order = self._flat_order
        outputs = None
        if order is not None:
            flat = [tf.constant(inputs[k], dtype=self._tf_dtypes[k]) for k in order]
            outputs = self.function._call_flat(flat, self.function.captured_inputs)
            if not isinstance(outputs, dict) or sorted(outputs) != self.output_keys:
                log.warning("signature '%s': the flat call answered %s; calling by keyword from "
                            "now on", self.name, type(outputs).__name__)
                self._flat_order, outputs = None, None
        if outputs is None:
            outputs = self.function(**{k: tf.constant(v, dtype=self._tf_dtypes[k])
                                       for k, v in inputs.items()})
        with self._lock:
            self.executions += 1
        return {k: v.numpy() for k, v in outputs.items()}

    def arrival(self, batch: bool = True):
        """Context manager around a request's decoding and run: while it is open, a batch being
        formed for this signature waits for the request (see batching.Batcher.arrival)."""
        if batch and self.batcher is not None:
            return self.batcher.arrival()
        return contextlib.nullcontext()

    def run(self, inputs: Dict[str, np.ndarray], batch: bool = True) -> Dict[str, np.ndarray]:
        if batch and self.batcher is not None:
            return self.batcher(inputs)
        return self._call(inputs)

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()


class ServableVersion:
    """One loaded version of a model: the SavedModel, its signatures, a request refcount."""

    def __init__(self, model_name: str, version: int, path: str,
                 batching: Optional[BatchingOptions]):
        import tensorflow as tf
        from tensorflow.python.saved_model import loader_impl

        self.model_name, self.version, self.path = model_name, version, path
        saved_model = loader_impl.parse_saved_model(path)
        served = [m for m in saved_model.meta_graphs if P.SERVE_TAG in m.meta_info_def.tags]
        if not served:
            raise ValueError(f"{path}: SavedModel has no MetaGraph tagged '{P.SERVE_TAG}'")
        self.signature_defs = dict(served[0].signature_def)
        self.loaded = tf.saved_model.load(path, tags=[P.SERVE_TAG])
        self.signatures: Dict[str, Signature] = {}
        for name, function in self.loaded.signatures.items():
            if name not in self.signature_defs:
                continue  # internal functions (e.g. __saved_model_init_op) are not served
            self.signatures[name] = Signature(name, self.signature_defs[name], function,
                                              batching, f"{model_name}-v{version}")
        if not self.signatures:
            raise ValueError(f"{path}: SavedModel has no serving signatures")
        self._inflight = 0
        self._lock = threading.Lock()

    def signature(self, name: str) -> Signature:
        name = name or P.DEFAULT_SIGNATURE
        if name not in self.signatures:
            raise errors.not_found(
                f"signature '{name}' not found in model '{self.model_name}' version "
                f"{self.version}; available signatures: {sorted(self.signatures)}")
        return self.signatures[name]

    def signature_def_map(self):
        from tensorflow.core.protobuf import meta_graph_pb2
        from tensorflow_serving.apis import get_model_metadata_pb2

        m = get_model_metadata_pb2.SignatureDefMap()
        for name, sig in self.signature_defs.items():
            if name in self.signatures:
                m.signature_def[name].CopyFrom(sig)
        _ = meta_graph_pb2
        return m

    @property
    def inflight(self) -> int:
        return self._inflight

    def _acquire(self) -> None:
        with self._lock:
            self._inflight += 1

    def _release(self) -> None:
        with self._lock:
            self._inflight -= 1

    def close(self) -> None:
        for sig in self.signatures.values():
            sig.close()


def _fingerprint(path: str) -> Tuple:
    """Changes whenever any file of a version changes (to retry a broken version): every file
    with its size and modification time (nanoseconds where the file system has them)."""
    import tensorflow as tf

    out = []
    if "://" not in path:  # local: os.stat has nanosecond mtimes, gfile only whole seconds
        for dirpath, _, files in os.walk(path):
            for f in files:
                p = os.path.join(dirpath, f)
                try:
                    st = os.stat(p)
                except OSError:
                    continue
                out.append((os.path.relpath(p, path), st.st_size, st.st_mtime_ns))
        return tuple(sorted(out))
    try:
        for dirpath, _, files in tf.io.gfile.walk(path):
            for f in files:
                p = os.path.join(dirpath, f)
                try:
                    st = tf.io.gfile.stat(p)
                except tf.errors.NotFoundError:
                    continue
                out.append((p[len(path):], st.length, st.mtime_nsec))
    except tf.errors.OpError:
        pass
    return tuple(sorted(out))


class _Model:
    def __init__(self, config):
        self.config = config
        self.versions: Dict[int, ServableVersion] = {}
        self.status: Dict[int, VersionStatus] = {}
        self.failed: Dict[int, Tuple] = {}  # version -> fingerprint at failure
        self.ignored_names: set = set()
        # Versions still served from a previous base_path: reloaded from the new one, then
        # swapped in, so a base_path change never leaves the model without a version.
        self.stale: set = set()

    @property
    def name(self) -> str:
        return self.config.name


def _policy_name(config) -> str:
    return config.model_version_policy.WhichOneof("policy_choice") or "latest"


def select_versions(config, candidates: List[int]) -> List[int]:
    """Versions the policy wants served, among loadable `candidates`."""
    policy = _policy_name(config)
    ordered = sorted(candidates, reverse=True)
    if policy == "all":
        return ordered
    if policy == "specific":
        wanted = set(config.model_version_policy.specific.versions)
        return [v for v in ordered if v in wanted]
    n = config.model_version_policy.latest.num_versions or 1
    return ordered[:n]


def validate_model_config(config) -> None:
    if not config.name:
        raise ValueError("every model_config needs a name")
    if not config.base_path:
        raise ValueError(f"model '{config.name}' has no base_path")
    if config.model_platform not in ("", "tensorflow"):
        raise ValueError(f"model '{config.name}': model_platform '{config.model_platform}' is "
                         "not supported (only 'tensorflow')")
    if _policy_name(config) == "specific" and not config.model_version_policy.specific.versions:
        raise ValueError(f"model '{config.name}': specific version policy lists no versions")


class ModelManager:
    """See the module docstring. Thread-safe; `start()` launches the poll thread."""

    def __init__(self, model_configs, batching: Optional[BatchingOptions] = None,
                 poll_wait_seconds: float = 1.0,
                 warmup: Optional[Callable[[ServableVersion, object], None]] = None,
                 on_change: Optional[Callable[[], None]] = None):
        self.batching = batching
        self.poll_wait_seconds = poll_wait_seconds
        self.warmup = warmup
        self.on_change = on_change
        self._lock = threading.RLock()
        self._poll_lock = threading.Lock()
        self._models: Dict[str, _Model] = {}
        self._retired: List[ServableVersion] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.set_configs(model_configs)

    # ---- configuration ----------------------------------------------------------------------
    def set_configs(self, model_configs) -> None:
        """Replaces the served models (HandleReloadConfigRequest / start-up)."""
        configs = list(model_configs)
        names = [c.name for c in configs]
        for c in configs:
            validate_model_config(c)
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate model names in config: {names}")
        with self._lock:
            for name in list(self._models):
                if name not in names:
                    model = self._models.pop(name)
                    for v in list(model.versions):
                        self._retire(model, v)
            for c in configs:
                if c.name in self._models:
                    model = self._models[c.name]
                    if model.config.base_path != c.base_path:
                        model.stale = set(model.versions)
                        model.failed.clear()
                        model.ignored_names.clear()
                    model.config = c
                else:
                    self._models[c.name] = _Model(c)

    def model_names(self) -> List[str]:
        with self._lock:
            return sorted(self._models)

    # ---- polling ------------------------------------------------------------------------------
    def start(self) -> None:
        self.poll_once()
        if self.poll_wait_seconds > 0:
            self._thread = threading.Thread(target=self._poll_loop, name="model-poll",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        with self._lock:
            for model in self._models.values():
                for v in list(model.versions):
                    self._retire(model, v)
        self._close_retired(force=True)

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_wait_seconds):
            try:
                self.poll_once()
            except Exception:  # a bad file system state must not kill the poller
                log.exception("model poll failed")

    def poll_once(self) -> None:
        """Lists every base path once, loads wanted versions, unloads unwanted ones."""
        with self._poll_lock:
            with self._lock:
                models = list(self._models.values())
            changed = False
            for model in models:
                changed |= self._poll_model(model)
            self._close_retired()
            if changed and self.on_change is not None:
                self.on_change()

    def _list_versions(self, model: _Model) -> Dict[int, str]:
        import tensorflow as tf

        base = model.config.base_path
        if not tf.io.gfile.isdir(base):
            log.warning("model '%s': base path %s does not exist (yet)", model.name, base)
            return {}
        found = {}
        for entry in tf.io.gfile.listdir(base):
            entry = entry.rstrip("/")
            if entry.isdigit() and tf.io.gfile.isdir(os.path.join(base, entry)):
                found[int(entry)] = os.path.join(base, entry)
            elif entry not in model.ignored_names:
                model.ignored_names.add(entry)
                log.info("model '%s': ignoring %s (version folders are numeric)", model.name,
                         os.path.join(base, entry))
        return found

    def _poll_model(self, model: _Model) -> bool:
        on_disk = self._list_versions(model)
        changed = False
        for v, fp in list(model.failed.items()):
            if v not in on_disk or _fingerprint(on_disk[v]) != fp:
                del model.failed[v]  # files changed or removed: may be retried
        while not self._stop.is_set():
            # When a load fails, the policy picks the next older loadable version right away.
            loadable = [v for v in on_disk if v not in model.failed]
            missing = [v for v in select_versions(model.config, loadable)
                       if v not in model.versions or v in model.stale]
            if not missing:
                break
            changed = True
            batch = [missing[0]]  # newest first
            fallback = self._fallback(model, loadable, missing[0])
            if fallback is not None:
                batch.append(fallback)
            self._load_concurrently(model, [(v, on_disk[v]) for v in batch])
        # Re-select: a failed load above must not make us unload the version it would replace.
        loadable = [v for v in on_disk if v not in model.failed]
        wanted = set(select_versions(model.config, loadable))
        with self._lock:
            for v in list(model.versions):
                if v not in wanted:
                    changed = True
                    self._retire(model, v)
        return changed

    @staticmethod
    def _fallback(model: _Model, loadable: List[int], newest: int) -> Optional[int]:
        """With nothing in service (a start or a restart after kill -9), the version the
        policy would pick if `newest` failed; it loads alongside `newest`, so a broken newest
        version (one that fails only after a full load, in its warmup, say) costs no extra
        load time before something serves. Both loads run at once only then, so memory
        doubles only while nothing is served; an unneeded fallback is unloaded right after."""
        if model.versions:
            return None
        rest = [v for v in loadable if v != newest]
        wanted = [v for v in select_versions(model.config, rest) if v not in model.versions]
        return wanted[0] if wanted else None

    def _load_concurrently(self, model: _Model, batch: List[Tuple[int, str]]) -> None:
        if len(batch) == 1:
            self._load(model, *batch[0])
            return
        threads = [threading.Thread(target=self._load, args=(model, v, path),
                                    name=f"load-{model.name}-{v}", daemon=True)
                   for v, path in batch]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _load(self, model: _Model, version: int, path: str) -> None:
        fp = _fingerprint(path)
        with self._lock:
            model.status[version] = VersionStatus(LOADING)
        started = time.monotonic()
        log.info("model '%s': loading version %d from %s", model.name, version, path)
        servable = None
        try:
            servable = ServableVersion(model.name, version, path, self.batching)
            warmed = self._run_warmup(servable)
        except Exception as exc:
            if servable is not None:
                servable.close()
            err = errors.from_exception(exc)
            message = f"loading version {version} from {path} failed: {err.message}"
            log.error("model '%s': %s; still serving versions %s", model.name, message,
                      sorted(model.versions) or "none")
            with self._lock:
                model.failed[version] = fp
                model.status[version] = VersionStatus(END, err.code.value[0], message)
            return
        with self._lock:
            replaced = model.versions.get(version)
            if replaced is not None:  # same number from the previous base_path
                self._retired.append(replaced)
            model.stale.discard(version)
            model.versions[version] = servable
            model.status[version] = VersionStatus(AVAILABLE)
        log.info("model '%s': version %d available (%.1fs, %d warmup requests)", model.name,
                 version, time.monotonic() - started, warmed)

    def _run_warmup(self, servable: ServableVersion) -> int:
        import tensorflow as tf
        from tensorflow_serving.apis import prediction_log_pb2

        path = os.path.join(servable.path, P.WARMUP_DIR, P.WARMUP_FILE)
        if self.warmup is None or not tf.io.gfile.exists(path):
            return 0
        count = 0
        for record in tf.data.TFRecordDataset(path).take(P.MAX_WARMUP_RECORDS):
            entry = prediction_log_pb2.PredictionLog.FromString(record.numpy())
            try:
                self.warmup(servable, entry)
            except Exception as exc:
                raise errors.ServingError(
                    errors.from_exception(exc).code,
                    f"warmup request {count} ({entry.WhichOneof('log_type')}) failed: "
                    f"{errors.from_exception(exc).message}") from exc
            count += 1
        return count

    def _retire(self, model: _Model, version: int) -> None:
        servable = model.versions.pop(version)
        model.status[version] = VersionStatus(UNLOADING)
        self._retired.append(servable)
        log.info("model '%s': unloading version %d", model.name, version)

    def _close_retired(self, force: bool = False) -> None:
        with self._lock:
            done = [s for s in self._retired if force or s.inflight == 0]
            self._retired = [s for s in self._retired if s not in done]
        for servable in done:
            servable.close()
            with self._lock:
                model = self._models.get(servable.model_name)
                if model is not None and model.status.get(servable.version, None) is not None \
                        and model.status[servable.version].state == UNLOADING:
                    model.status[servable.version] = VersionStatus(END)

    # ---- request side -------------------------------------------------------------------------
    def _model(self, name: str) -> _Model:
        if not name:
            raise errors.invalid_argument("model_spec.name is empty")
        model = self._models.get(name)
        if model is None:
            raise errors.not_found(f"model '{name}' is not served; served models: "
                                   f"{sorted(self._models)}")
        return model

    def resolve(self, name: str, version: Optional[int] = None,
                label: Optional[str] = None) -> ServableVersion:
        with self._lock:
            model = self._model(name)
            if label:
                labels = dict(model.config.version_labels)
                if label not in labels:
                    raise errors.not_found(f"model '{name}' has no version label '{label}'; "
                                           f"labels: {labels}")
                version = labels[label]
                if version not in model.versions:
                    raise errors.not_found(f"label '{label}' of model '{name}' points to version "
                                           f"{version}, which is not loaded; loaded versions: "
                                           f"{sorted(model.versions)}")
            if version is not None:
                if version not in model.versions:
                    raise errors.not_found(f"model '{name}' version {version} is not loaded; "
                                           f"loaded versions: {sorted(model.versions)}")
                return model.versions[version]
            if not model.versions:
                raise errors.unavailable(
                    f"model '{name}' has no loaded version yet (base path "
                    f"{model.config.base_path}); see GetModelStatus for load errors")
            return model.versions[max(model.versions)]

    @contextlib.contextmanager
    def acquire(self, name: str, version: Optional[int] = None, label: Optional[str] = None):
        """Resolves a version and keeps it alive for the duration of the request."""
        with self._lock:
            servable = self.resolve(name, version, label)
            servable._acquire()
        try:
            yield servable
        finally:
            servable._release()

    def version_status(self, name: str, version: Optional[int] = None,
                       label: Optional[str] = None) -> Dict[int, VersionStatus]:
        with self._lock:
            model = self._model(name)
            if label:
                labels = dict(model.config.version_labels)
                if label not in labels:
                    raise errors.not_found(f"model '{name}' has no version label '{label}'")
                version = labels[label]
            if version is not None:
                if version not in model.status:
                    raise errors.not_found(f"model '{name}' has no version {version}; known: "
                                           f"{sorted(model.status)}")
                return {version: model.status[version]}
            if not model.status:
                raise errors.not_found(f"model '{name}' has no versions yet under "
                                       f"{model.config.base_path}")
            return dict(model.status)

    def available(self, name: Optional[str] = None) -> bool:
        with self._lock:
            models = [self._models[name]] if name in self._models else \
                ([] if name else list(self._models.values()))
            return bool(models) and all(m.versions for m in models)

    def loaded_versions(self, name: str) -> List[int]:
        with self._lock:
            return sorted(self._model(name).versions)

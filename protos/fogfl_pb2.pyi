from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("name", "shape", "dtype", "data", "pad")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    PAD_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    data: bytes
    pad: bytes
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., data: _Optional[bytes] = ..., pad: _Optional[bytes] = ...) -> None: ...

class TensorSet(_message.Message):
    __slots__ = ("tensors",)
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class SampleBatch(_message.Message):
    __slots__ = ("edge_id", "fog_id", "seq", "round", "model_version", "x", "y", "sample_ids", "scores", "strategy")
    EDGE_ID_FIELD_NUMBER: _ClassVar[int]
    FOG_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    edge_id: str
    fog_id: str
    seq: int
    round: int
    model_version: int
    x: Tensor
    y: _containers.RepeatedScalarFieldContainer[int]
    sample_ids: _containers.RepeatedScalarFieldContainer[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    strategy: str
    def __init__(self, edge_id: _Optional[str] = ..., fog_id: _Optional[str] = ..., seq: _Optional[int] = ..., round: _Optional[int] = ..., model_version: _Optional[int] = ..., x: _Optional[_Union[Tensor, _Mapping]] = ..., y: _Optional[_Iterable[int]] = ..., sample_ids: _Optional[_Iterable[int]] = ..., scores: _Optional[_Iterable[float]] = ..., strategy: _Optional[str] = ...) -> None: ...

class EdgeModel(_message.Message):
    __slots__ = ("version", "round", "onnx", "sha256", "arch", "announcement")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ONNX_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    ANNOUNCEMENT_FIELD_NUMBER: _ClassVar[int]
    version: int
    round: int
    onnx: bytes
    sha256: str
    arch: str
    announcement: str
    def __init__(self, version: _Optional[int] = ..., round: _Optional[int] = ..., onnx: _Optional[bytes] = ..., sha256: _Optional[str] = ..., arch: _Optional[str] = ..., announcement: _Optional[str] = ...) -> None: ...

class LocalHParams(_message.Message):
    __slots__ = ("lr", "epochs", "steps", "batch_size", "optimizer", "momentum", "prox_mu", "shuffle")
    LR_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    PROX_MU_FIELD_NUMBER: _ClassVar[int]
    SHUFFLE_FIELD_NUMBER: _ClassVar[int]
    lr: float
    epochs: int
    steps: int
    batch_size: int
    optimizer: str
    momentum: float
    prox_mu: float
    shuffle: bool
    def __init__(self, lr: _Optional[float] = ..., epochs: _Optional[int] = ..., steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., optimizer: _Optional[str] = ..., momentum: _Optional[float] = ..., prox_mu: _Optional[float] = ..., shuffle: _Optional[bool] = ...) -> None: ...

class ModelRequest(_message.Message):
    __slots__ = ("fog_id", "round", "wait_ms")
    FOG_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    fog_id: str
    round: int
    wait_ms: int
    def __init__(self, fog_id: _Optional[str] = ..., round: _Optional[int] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class ModelHeader(_message.Message):
    __slots__ = ("version", "round", "arch_json", "total_bytes", "train_json", "announcement")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ARCH_JSON_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_JSON_FIELD_NUMBER: _ClassVar[int]
    ANNOUNCEMENT_FIELD_NUMBER: _ClassVar[int]
    version: int
    round: int
    arch_json: str
    total_bytes: int
    train_json: str
    announcement: str
    def __init__(self, version: _Optional[int] = ..., round: _Optional[int] = ..., arch_json: _Optional[str] = ..., total_bytes: _Optional[int] = ..., train_json: _Optional[str] = ..., announcement: _Optional[str] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("fog_id", "round", "base_version", "num_samples", "update_kind", "hparams", "total_bytes", "labels_total", "edge_bytes_up", "edge_bytes_down", "defense", "train_loss", "label_counts")
    class LabelCountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    FOG_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    UPDATE_KIND_FIELD_NUMBER: _ClassVar[int]
    HPARAMS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    LABELS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    EDGE_BYTES_UP_FIELD_NUMBER: _ClassVar[int]
    EDGE_BYTES_DOWN_FIELD_NUMBER: _ClassVar[int]
    DEFENSE_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    LABEL_COUNTS_FIELD_NUMBER: _ClassVar[int]
    fog_id: str
    round: int
    base_version: int
    num_samples: int
    update_kind: str
    hparams: LocalHParams
    total_bytes: int
    labels_total: int
    edge_bytes_up: int
    edge_bytes_down: int
    defense: str
    train_loss: float
    label_counts: _containers.ScalarMap[int, int]
    def __init__(self, fog_id: _Optional[str] = ..., round: _Optional[int] = ..., base_version: _Optional[int] = ..., num_samples: _Optional[int] = ..., update_kind: _Optional[str] = ..., hparams: _Optional[_Union[LocalHParams, _Mapping]] = ..., total_bytes: _Optional[int] = ..., labels_total: _Optional[int] = ..., edge_bytes_up: _Optional[int] = ..., edge_bytes_down: _Optional[int] = ..., defense: _Optional[str] = ..., train_loss: _Optional[float] = ..., label_counts: _Optional[_Mapping[int, int]] = ...) -> None: ...

class Trailer(_message.Message):
    __slots__ = ("xxh3_128",)
    XXH3_128_FIELD_NUMBER: _ClassVar[int]
    xxh3_128: str
    def __init__(self, xxh3_128: _Optional[str] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("model_header", "update_header", "data", "trailer")
    MODEL_HEADER_FIELD_NUMBER: _ClassVar[int]
    UPDATE_HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    model_header: ModelHeader
    update_header: UpdateHeader
    data: bytes
    trailer: Trailer
    def __init__(self, model_header: _Optional[_Union[ModelHeader, _Mapping]] = ..., update_header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., trailer: _Optional[_Union[Trailer, _Mapping]] = ...) -> None: ...

class ModelReply(_message.Message):
    __slots__ = ("header", "data", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: ModelHeader
    data: bytes
    trailer: Trailer
    def __init__(self, header: _Optional[_Union[ModelHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., trailer: _Optional[_Union[Trailer, _Mapping]] = ...) -> None: ...

class UpdateRequest(_message.Message):
    __slots__ = ("header", "data", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    data: bytes
    trailer: Trailer
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., trailer: _Optional[_Union[Trailer, _Mapping]] = ...) -> None: ...

class UploadAck(_message.Message):
    __slots__ = ("accepted", "reason", "round")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    round: int
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class Capture(_message.Message):
    __slots__ = ("format_version", "source", "arch_json", "round", "fog_id", "model_version", "served_payload", "header", "update_payload", "served_sha256", "update_sha256", "captured_at", "note")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    ARCH_JSON_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    FOG_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVED_PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    UPDATE_PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SERVED_SHA256_FIELD_NUMBER: _ClassVar[int]
    UPDATE_SHA256_FIELD_NUMBER: _ClassVar[int]
    CAPTURED_AT_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    source: str
    arch_json: str
    round: int
    fog_id: str
    model_version: int
    served_payload: bytes
    header: UpdateHeader
    update_payload: bytes
    served_sha256: str
    update_sha256: str
    captured_at: float
    note: str
    def __init__(self, format_version: _Optional[int] = ..., source: _Optional[str] = ..., arch_json: _Optional[str] = ..., round: _Optional[int] = ..., fog_id: _Optional[str] = ..., model_version: _Optional[int] = ..., served_payload: _Optional[bytes] = ..., header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., update_payload: _Optional[bytes] = ..., served_sha256: _Optional[str] = ..., update_sha256: _Optional[str] = ..., captured_at: _Optional[float] = ..., note: _Optional[str] = ...) -> None: ...

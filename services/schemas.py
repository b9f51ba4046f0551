"""Pydantic models at the boundaries: what a client sends (JobSpec) and what it reads back."""

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PrivateAttr,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

# Unknown fields one model reports one by one; past these, one error counts them.
MAX_UNKNOWN_FIELDS = 20


class StrictModel(BaseModel):
    """Input model: unknown fields and non-finite numbers (JSON parsers allow NaN) are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _few_unknown_fields(cls, data: Any) -> Any:
        # Each unknown field is an error of its own: a body of a million unknown keys would
        # make a million errors, seconds of the API's event loop to build and render.
        fields = cls.model_fields
        if isinstance(data, dict) and len(data) > len(fields) + MAX_UNKNOWN_FIELDS:
            unknown = [key for key in data if key not in fields]
            raise PydanticCustomError(
                "extra_forbidden",
                "Extra inputs are not permitted: {count} unknown fields, the first {first}",
                {"count": len(unknown), "first": repr(unknown[0])[:100]},
            )
        return data


class SyntheticParams(StrictModel):
    """A generated problem: x ~ N(0, 1), y = x @ w_true (+ b_true) + noise."""

    n: int = Field(ge=1, description="samples")
    d: int = Field(ge=1, description="features")
    noise: float = Field(default=0.01, ge=0)
    seed: int = 0


def flat_x_is_one_feature(value: Any) -> Any:
    """A flat list of numbers for x is one feature: [1, 2] -> [[1], [2]]."""
    if isinstance(value, list) and value and not any(isinstance(v, list) for v in value):
        return [[v] for v in value]
    return value


def rectangular(x: list[list[float]]) -> list[list[float]]:
    """x itself if it has rows, all of the same non-zero width; else ValueError saying where."""
    if not x:
        raise ValueError("x is empty: give at least one sample")
    width = len(x[0])
    if width == 0:
        raise ValueError("x rows are empty: give at least one feature")
    for i, row in enumerate(x):
        if len(row) != width:
            raise ValueError(f"x is ragged: row {i} has {len(row)} values, row 0 has {width}")
    return x


# A list of numbers stops at its first bad item: two million bad items make one error, not two
# million (building those and their 422 would hold the API's event loop for seconds).
Numbers = Annotated[list[float], Field(fail_fast=True)]
# At least one, as the schema says; the validators say why (an empty x, row or y).
NONEMPTY = {"minItems": 1}
_NUMBERS = {"type": "array", "items": {"type": "number"}, **NONEMPTY}

# Rows of x: a flat list of numbers is one feature; rows must all have the same width (which
# JSON Schema cannot say).
Rows = Annotated[
    list[Numbers],
    Field(fail_fast=True),
    BeforeValidator(flat_x_is_one_feature),
    AfterValidator(rectangular),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "array", "items": _NUMBERS, **NONEMPTY},
                {**_NUMBERS, "description": "one feature: a number per sample"},
            ]
        }
    ),
]


def _only(source: str, schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON Schema branch: `source` is given (not null), and the other sources are not."""
    others = [key for key in ("x", "y", "synthetic", "dataset_id") if key not in schema]
    return {
        "title": source,
        "required": list(schema),
        "properties": {**schema, **{key: {"type": "null"} for key in others}},
    }


# DataSpec's one-source rule, in the schema: exactly one of x and y, synthetic, dataset_id.
ONE_SOURCE: list[Any] = [
    _only("inline", {"x": {"type": "array"}, "y": {"type": "array"}}),
    _only("synthetic", {"synthetic": {"type": "object"}}),
    _only("dataset", {"dataset_id": {"type": "string"}}),
]


class DataSpec(StrictModel):
    """Training data: inline `x` and `y`, `synthetic` parameters, or an uploaded dataset;
    exactly one of them."""

    model_config = ConfigDict(json_schema_extra={"oneOf": ONE_SOURCE})

    x: Rows | None = Field(
        default=None, description="one row per sample; a flat list means one feature"
    )
    y: Annotated[Numbers, Field(json_schema_extra=NONEMPTY)] | None = None
    synthetic: SyntheticParams | None = None
    dataset_id: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="an uploaded dataset (POST /v1/datasets): its sha256",
    )
    # An uploaded dataset's (samples, features), known once it is looked up (not part of the
    # spec a client sends or reads back).
    _shape: tuple[int, int] | None = PrivateAttr(default=None)

    @field_validator("y")
    @classmethod
    def _one_target_per_row(cls, y: list[float] | None, info: ValidationInfo) -> list[float] | None:
        if y is None:
            return y
        if not y:
            raise ValueError("y is empty: give one target per sample")
        x = info.data.get("x")
        if x is not None and len(x) != len(y):
            raise ValueError(f"y has {len(y)} values but x has {len(x)} rows")
        return y

    @model_validator(mode="before")
    @classmethod
    def _one_source(cls, data: Any) -> Any:
        # Decided by the keys given, before their values are validated: an x of millions of
        # values beside `synthetic` is refused without validating them first.
        if not isinstance(data, dict):
            return data  # pydantic reports the type
        given = {key for key in ("x", "y", "synthetic", "dataset_id") if data.get(key) is not None}
        inline = given & {"x", "y"}
        sources = int(bool(inline)) + len(given & {"synthetic", "dataset_id"})
        if sources > 1:
            raise ValueError("data takes one of: x and y, synthetic, or dataset_id")
        if sources == 0:
            raise ValueError("data needs x and y, synthetic, or dataset_id")
        if len(inline) == 1:
            missing = "y" if "x" in inline else "x"
            raise ValueError(f"data.{missing} is missing: inline data needs both x and y")
        return data

    def resolve(self, samples: int, features: int) -> None:
        """Give an uploaded dataset's shape (from its stored metadata)."""
        self._shape = (samples, features)

    @property
    def known(self) -> bool:
        """Whether the shape is known: always, but for a dataset not looked up yet."""
        return self.dataset_id is None or self._shape is not None

    @property
    def samples(self) -> int:
        if self.synthetic is not None:
            return self.synthetic.n
        if self.dataset_id is not None:
            assert self._shape is not None, "the dataset's shape is not resolved"
            return self._shape[0]
        assert self.y is not None
        return len(self.y)

    @property
    def features(self) -> int:
        if self.synthetic is not None:
            return self.synthetic.d
        if self.dataset_id is not None:
            assert self._shape is not None, "the dataset's shape is not resolved"
            return self._shape[1]
        assert self.x is not None
        return len(self.x[0])


class InitSpec(StrictModel):
    """Initial parameters; `w` defaults to zeros and `b` to 0."""

    w: Numbers | None = None
    b: float | None = None


class ScheduleSpec(StrictModel):
    """How the learning rate changes with the steps (torch.optim.lr_scheduler): `constant`;
    `step`, times `gamma` every `step_size` steps; `cosine`, from lr down to `eta_min` over
    the job's steps."""

    name: Literal["constant", "step", "cosine"] = "constant"
    step_size: int = Field(default=100, ge=1)
    gamma: float = Field(default=0.1, gt=0, le=1)
    eta_min: float = Field(default=0.0, ge=0)


class OptimizerSpec(StrictModel):
    """The optimizer (torch.optim's SGD, Adam or AdamW), its settings and the lr schedule."""

    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(default=0.01, gt=0)
    momentum: float = Field(default=0.0, ge=0, lt=1, description="sgd only")
    nesterov: bool = Field(default=False, description="sgd with momentum only")
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = Field(default=(0.9, 0.999), description="adam and adamw")
    eps: float = Field(default=1e-8, gt=0, description="adam and adamw")
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= beta < 1 for beta in betas):
            raise ValueError("betas must each be in [0, 1)")
        return betas

    @model_validator(mode="after")
    def _settings_fit_the_optimizer(self) -> Self:
        if self.name != "sgd" and (self.momentum or self.nesterov):
            raise ValueError(f"momentum and nesterov are sgd settings, not {self.name}'s")
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        return self


# The explain view stores the whole computational graph of every step: small jobs only.
EXPLAIN_MAX_SAMPLES = 16
EXPLAIN_MAX_FEATURES = 8


class RecordSpec(StrictModel):
    """What the step records hold: every step's loss, gradients and parameters by default;
    with `every` N > 1 (DESIGN §10), gradients and parameters (and the explain view) only at
    steps divisible by N and at the last step, the loss at every step."""

    explain: bool = Field(
        default=False,
        description=(
            "the tutorial's computational graph of each step that keeps its gradients "
            "(y_hat = x @ w, s = y_hat - y, "
            f"loss = mean(s^2)) from autograd; full batch, at most {EXPLAIN_MAX_SAMPLES} samples "
            f"and {EXPLAIN_MAX_FEATURES} features"
        ),
    )
    every: int = Field(
        default=1,
        ge=1,
        strict=True,
        description=(
            "keep gradients and parameters at steps divisible by every, and at the last step; "
            "every step keeps its loss (and val_loss where evaluated)"
        ),
    )


class StopSpec(StrictModel):
    """Ending a job before its `steps`: when the loss stops changing, when the gradient is
    (almost) zero, or when its time is up. The JobView's `stop_reason` says which."""

    tol_loss: float | None = Field(
        default=None, gt=0, description="stop once |loss - previous step's loss| < tol_loss"
    )
    tol_grad: float | None = Field(
        default=None, gt=0, description="stop once the gradient's L2 norm < tol_grad"
    )
    max_seconds: float | None = Field(
        default=None, gt=0, description="stop after this long since the job started"
    )


def holdout_size(samples: int, fraction: float) -> int:
    """Validation rows of a holdout split: round(fraction x samples), Python's rounding (half to
    even)."""
    return round(fraction * samples)


class EvalSpec(StrictModel):
    """Held-out evaluation (DESIGN §11): a seeded `holdout` fraction of the data, or an
    explicit validation set `data`; the validation loss is computed at every step divisible by
    `every` and at the last step."""

    holdout: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description=(
            "the rows of torch.randperm(n, generator=torch.Generator().manual_seed(seed)) at "
            "positions 0 .. round(holdout * n) - 1 are the validation rows, the others (in "
            "their order) the training rows"
        ),
    )
    seed: int = Field(default=0, ge=0, description="the holdout split's seed")
    data: DataSpec | None = Field(
        default=None, description="an explicit validation set: inline x and y, or a dataset_id"
    )
    every: int = Field(default=1, ge=1, description="evaluate at steps divisible by every")

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.holdout is None) == (self.data is None):
            raise ValueError("eval takes one of: holdout (a fraction of the data) or data")
        if self.data is not None and self.data.synthetic is not None:
            raise ValueError("eval.data takes inline x and y, or a dataset_id")
        return self


def eval_problem(evaluation: "EvalSpec", data: DataSpec) -> tuple[str, str] | None:
    """(field, problem) where the validation set does not fit the training data, or None."""
    if evaluation.holdout is not None:
        samples = data.samples
        held = holdout_size(samples, evaluation.holdout)
        if held < 1 or held > samples - 1:
            return (
                "eval.holdout",
                f"eval.holdout: a holdout of {evaluation.holdout} of {samples} samples leaves "
                f"{held} validation and {samples - held} training rows; each side needs >= 1",
            )
        return None
    assert evaluation.data is not None
    if evaluation.data.known and evaluation.data.features != data.features:
        return (
            "eval.data",
            f"eval.data: the validation set has {evaluation.data.features} feature(s) but the "
            f"data has {data.features}",
        )
    return None


DeviceRequest = Literal["cpu", "cuda", "auto"]


class JobSpec(StrictModel):
    """What a client submits: a linear-regression training job."""

    data: DataSpec
    bias: bool = False
    init: InitSpec | None = None
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    steps: int = Field(default=100, ge=1)
    device: DeviceRequest = "auto"
    batch_size: int | None = Field(
        default=None, ge=1, description="samples per step; none (or >= samples): the full batch"
    )
    shuffle_seed: int = Field(default=0, ge=0, description="the mini-batch order's seed")
    stop: StopSpec | None = None
    record: RecordSpec = Field(default_factory=RecordSpec)
    eval: EvalSpec | None = Field(
        default=None, description="held-out evaluation: val_loss in the records and the result"
    )

    @field_validator("init")
    @classmethod
    def _init_fits_model(cls, init: InitSpec | None, info: ValidationInfo) -> InitSpec | None:
        # `data` and `bias` are declared before `init`, so they are validated by now. An
        # uploaded dataset's shape is checked when the job is submitted (fit_problems).
        data: DataSpec | None = info.data.get("data")
        if init is not None and data is not None and data.known:
            problem = init_problem(init, data.features, info.data.get("bias", False))
            if problem:
                raise ValueError(problem)
        return init

    @field_validator("record")
    @classmethod
    def _explain_only_small_full_batch(cls, record: RecordSpec, info: ValidationInfo) -> RecordSpec:
        data: DataSpec | None = info.data.get("data")
        if data is not None and data.known:
            problem = explain_problem(record, data, info.data.get("batch_size"))
            if problem:
                raise ValueError(problem)
        return record

    @field_validator("eval")
    @classmethod
    def _eval_fits_data(cls, evaluation: EvalSpec | None, info: ValidationInfo) -> EvalSpec | None:
        data: DataSpec | None = info.data.get("data")
        if evaluation is not None and data is not None and data.known:
            problem = eval_problem(evaluation, data)
            if problem:
                raise ValueError(problem[1])
        return evaluation

    @property
    def train_samples(self) -> int:
        """The samples the job trains on: all of them, less a holdout's validation rows."""
        samples = self.data.samples
        if self.eval is not None and self.eval.holdout is not None:
            return samples - holdout_size(samples, self.eval.holdout)
        return samples

    def fit_problems(self) -> list[tuple[str, str]]:
        """(field, problem) for what does not fit the data's shape: for a dataset, checked
        once its shape is resolved (inline and synthetic data are checked on validation)."""
        problems = []
        if self.init is not None and (
            problem := init_problem(self.init, self.data.features, self.bias)
        ):
            problems.append(("init", problem))
        if problem := explain_problem(self.record, self.data, self.batch_size):
            problems.append(("record", problem))
        if self.eval is not None and (fit := eval_problem(self.eval, self.data)):
            problems.append(fit)
        return problems


def init_problem(init: InitSpec, features: int, bias: bool) -> str | None:
    if init.w is not None and len(init.w) != features:
        return f"init.w has {len(init.w)} values but the data has {features} feature(s)"
    if init.b is not None and not bias:
        return "init.b is allowed only with bias: true"
    return None


def explain_problem(record: RecordSpec, data: DataSpec, batch_size: int | None) -> str | None:
    if not record.explain:
        return None
    if data.samples > EXPLAIN_MAX_SAMPLES or data.features > EXPLAIN_MAX_FEATURES:
        return (
            f"explain is for small jobs: at most {EXPLAIN_MAX_SAMPLES} samples and "
            f"{EXPLAIN_MAX_FEATURES} features (this one has {data.samples} x {data.features})"
        )
    if batch_size is not None and batch_size < data.samples:
        return "explain needs the full batch (no batch_size below the samples)"
    return None


# What a sweep may vary (DESIGN §9): dotted JobSpec fields. Data, bias, device, stop and
# record stay the base's: members that share them can share a batched step.
SWEEP_PATHS = frozenset(
    {
        *(f"optimizer.{name}" for name in ("name", "lr", "momentum", "nesterov")),
        *(f"optimizer.{name}" for name in ("weight_decay", "betas", "eps")),
        *(f"optimizer.schedule.{name}" for name in ScheduleSpec.model_fields),
        "init.w",
        "init.b",
        "batch_size",
        "shuffle_seed",
        "steps",
    }
)


def sweepable(path: str) -> str:
    """`path` itself if a sweep may vary it; else ValueError naming the paths it may."""
    if path not in SWEEP_PATHS:
        raise ValueError(f"{path!r} is not a path a sweep can vary: one of {sorted(SWEEP_PATHS)}")
    return path


SweepPath = Annotated[str, AfterValidator(sweepable)]


class Distribution(StrictModel):
    """Where a random search draws one path's values: exactly one of `uniform` and
    `log_uniform` (floats in [low, high]), `int_uniform` (integers, both ends included) or
    `choice` (one of the listed values, each as likely)."""

    uniform: tuple[float, float] | None = None
    log_uniform: tuple[float, float] | None = None
    int_uniform: tuple[int, int] | None = None
    choice: list[Any] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_kind_low_to_high(self) -> Self:
        given = [name for name in DISTRIBUTIONS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DISTRIBUTIONS)}")
        bounds = self.uniform or self.log_uniform or self.int_uniform
        if bounds is not None and bounds[0] > bounds[1]:
            raise ValueError(f"{given[0]}: low {bounds[0]} is above high {bounds[1]}")
        if self.log_uniform is not None and self.log_uniform[0] <= 0:
            raise ValueError("log_uniform needs 0 < low")
        return self

    @property
    def kind(self) -> str:
        """Which distribution this is: one of DISTRIBUTIONS."""
        return next(name for name in DISTRIBUTIONS if getattr(self, name) is not None)


DISTRIBUTIONS = ("uniform", "log_uniform", "int_uniform", "choice")


class RandomSearch(StrictModel):
    """`count` draws from `space`, the same every time for the same `seed`."""

    count: int = Field(ge=1)
    seed: int = Field(default=0, ge=0)
    space: dict[SweepPath, Distribution] = Field(min_length=1)


class EarlyStop(StrictModel):
    """Successive halving: at `min_steps * eta^k` steps the best 1/eta of a group's running
    members go on and the others are pruned."""

    name: Literal["successive_halving"]
    min_steps: int = Field(ge=1)
    eta: int = Field(default=3, ge=2)


class SweepSpec(StrictModel):
    """A hyperparameter search (DESIGN §9): `base` is a JobSpec's fields, validated once per
    member with the member's values from `grid` and `random` applied (so base may leave out
    what the grid gives)."""

    name: str | None = Field(default=None, max_length=200)
    base: dict[str, Any]
    grid: dict[SweepPath, Annotated[list[Any], Field(min_length=1)]] | None = Field(
        default=None, description="path -> values; every combination, the last path fastest"
    )
    random: RandomSearch | None = None
    early_stop: EarlyStop | None = None
    metric: Literal["loss", "val_loss"] | None = Field(
        default=None,
        validate_default=True,
        description=(
            "what halving and `best` rank by (lower first): the training loss, or the "
            "validation loss (the base needs eval); default val_loss when the base has eval"
        ),
    )

    @field_validator("metric")
    @classmethod
    def _metric_is_measured(cls, metric: str | None, info: ValidationInfo) -> str:
        evaluated = (info.data.get("base") or {}).get("eval") is not None
        if metric is None:
            return "val_loss" if evaluated else "loss"
        if metric == "val_loss" and not evaluated:
            raise ValueError("metric val_loss needs held-out data: give the base an eval")
        return metric

    @field_validator("random")
    @classmethod
    def _paths_once(cls, random: RandomSearch | None, info: ValidationInfo) -> RandomSearch | None:
        grid = info.data.get("grid") or {}
        both = [path for path in grid if random is not None and path in random.space]
        if both:
            raise ValueError(f"{both[0]!r} is in both grid and random.space: give it once")
        return random

    @model_validator(mode="after")
    def _something_to_search(self) -> Self:
        if not self.grid and self.random is None:
            raise ValueError("a sweep needs a grid, a random search, or both")
        return self


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DIVERGED = "diverged"
    PRUNED = "pruned"  # a sweep member that successive halving stopped at a rung

    @property
    def finished(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.CANCELLED,
        JobStatus.DIVERGED,
        JobStatus.PRUNED,
    }
)


def iso_utc(moment: datetime) -> str:
    """The one format of times the service writes: ISO 8601 UTC with microseconds and `Z`."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


UtcTime = Annotated[datetime, PlainSerializer(iso_utc, return_type=str)]
"""A time rendered as ISO 8601 UTC with microseconds, e.g. 2026-11-26T12:00:00.000000Z."""

# A parameter or gradient: a list for w, a number for b; null where it was not finite.
ParamValues = dict[str, list[float | None] | float | None]


class StepRecord(BaseModel):
    """One training step: the loss, the gradients, and the parameters used in its forward pass."""

    step: int
    loss: float | None
    grads: ParamValues | None = Field(
        default=None,
        description="absent at steps a job with record.every N > 1 does not keep (not % N)",
    )
    params: ParamValues | None = Field(
        default=None, description="absent where `grads` is (record.every)"
    )
    val_loss: float | None = Field(
        default=None,
        description="the validation loss at `params` (evaluated steps of jobs with eval only)",
    )
    epoch: int | None = Field(default=None, description="mini-batch jobs only")
    batch: int | None = Field(default=None, description="mini-batch jobs only")
    explain: dict[str, Any] | None = Field(
        default=None, description="the step's computational graph (record.explain jobs only)"
    )


class JobResult(BaseModel):
    """Final parameters (after the last update) and the last step's loss; why the job ended;
    and how good the fit is on all the data: its loss and R², and the gap to the least-squares
    solution (computed by the worker for problems of up to 10^7 samples x features)."""

    params: ParamValues
    loss: float | None
    stopped: str | None = None
    full_loss: float | None = None
    r2: float | None = None
    lstsq_params: ParamValues | None = None
    lstsq_loss: float | None = None
    lstsq_gap: float | None = Field(default=None, description="full_loss - lstsq_loss")
    stepper: str | None = Field(
        default=None,
        description="how the last attempt ran its steps: eager, compiled (CPU) or cuda-graph",
    )
    val_loss: float | None = Field(
        default=None, description="the validation loss at the final parameters (jobs with eval)"
    )
    metrics: dict[str, dict[str, float | None]] | None = Field(
        default=None,
        description=(
            "mse, rmse, mae and r2 at the final parameters in float64: `train` on the training "
            "rows, `val` on the validation rows (jobs with eval)"
        ),
    )


class _JobFields(BaseModel):
    """What a JobView and a listing's row share: everything but the spec."""

    id: str
    status: JobStatus
    device: Literal["cpu", "cuda"]
    route_reason: str
    worker: str | None
    attempt: int
    steps_done: int
    created_at: UtcTime
    started_at: UtcTime | None
    finished_at: UtcTime | None
    result: JobResult | None
    error: str | None
    stop_reason: str | None = Field(
        default=None, description="why the job ended: all its steps, a stop rule, an error"
    )
    sweep: str | None = Field(default=None, description="the sweep it is a member of, if any")


class AttemptEnvironment(BaseModel):
    """Where and how one attempt ran its steps: what a resume must match to be bit for bit."""

    attempt: int
    device: Literal["cpu", "cuda"] = Field(description="the device type it computed on")
    device_name: str = Field(description="the GPU's model, or the CPU's")
    torch: str = Field(description="torch.__version__")
    cpu_capability: str = Field(description="torch.backends.cpu.get_cpu_capability()")
    threads: int = Field(description="torch.get_num_threads()")
    stepper: str = Field(description="how it ran the steps: eager, compiled or cuda-graph")
    worker: str | None = None


class JobView(_JobFields):
    """A job as clients see it."""

    spec: JobSpec
    stepper: str | None = Field(
        default=None,
        description="the step implementation the first attempt chose, which every later "
        "attempt runs: eager, compiled (CPU) or cuda-graph (GPU)",
    )
    attempts: list[AttemptEnvironment] = Field(
        default=[], description="each attempt that stored steps, and what it ran on"
    )
    resume: str | None = Field(
        default=None,
        description="null unless a later attempt ran under other conditions than the first "
        "(device type, CPU instruction set, torch version, threads, stepper): which changed",
    )


class JobSummary(_JobFields):
    """A job as listings show it: the spec without inline data, which reads
    `{"inline": {"samples": n, "features": d}}` (GET /v1/jobs/{id} has the whole spec)."""

    spec: dict[str, Any]


MAX_PREDICT_ROWS = 10_000


def _rows_at_most(schema: dict[str, Any]) -> None:
    """x's schema: at most MAX_PREDICT_ROWS samples, as rows or as a flat list."""
    for branch in schema["anyOf"]:
        branch["maxItems"] = MAX_PREDICT_ROWS


class PredictRequest(StrictModel):
    """Rows to predict with a finished job's parameters (a flat list means one feature)."""

    x: Rows = Field(
        min_length=1,
        max_length=MAX_PREDICT_ROWS,
        json_schema_extra=_rows_at_most,
    )


class Prediction(BaseModel):
    y_hat: list[float | None] = Field(description="null where the product overflows float64")


class DatasetInfo(BaseModel):
    """An uploaded dataset: its id (the sha256 of the uploaded bytes) and shape; or a sweep's
    inline data, kept once for all its members (format `inline`, `sweep` its sweep)."""

    id: str
    samples: int
    features: int
    format: Literal["csv", "npy", "npz", "inline"]
    columns: list[str] | None = Field(description="CSV: the feature columns, in order")
    target: str | None = Field(description="CSV: the target column")
    bytes: int = Field(description="the uploaded file's size")
    created_at: UtcTime
    loads: int = Field(description="times a worker moved it from Redis (once per worker)")
    sweep: str | None = Field(
        default=None, description="the sweep whose inline data it is (deleted with the sweep)"
    )


class JobList(BaseModel):
    jobs: list[JobSummary]
    next: str | None


class StepsPage(BaseModel):
    steps: list[StepRecord]
    next: int | None


class WorkerInfo(BaseModel):
    """A live worker process and what it can run."""

    name: str
    device: str
    device_name: str
    memory_bytes: int
    queues: list[str]
    current_job: str | None
    heartbeat_at: UtcTime


class QueueDepth(BaseModel):
    """A worker queue and the jobs waiting in it (not those a worker has taken)."""

    name: str
    depth: int


class WorkerList(BaseModel):
    workers: list[WorkerInfo]
    queues: list[QueueDepth] = Field(
        default_factory=list, description="each worker queue (cpu, gpu and any a worker reads)"
    )


class SweepStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"  # every member ended, at least one succeeded
    FAILED = "failed"  # every member ended, none succeeded, and the sweep was not cancelled
    CANCELLED = "cancelled"


# Members per page of GET /v1/sweeps/{id} (`members_limit`): by default, and at most.
SWEEP_MEMBERS_PAGE = 100
MAX_SWEEP_MEMBERS_PAGE = 1000


class SweepMember(BaseModel):
    """A member as its sweep shows it: its swept values by path, the last step's loss and the
    result's full-batch loss; with eval, the last evaluated step's validation loss and the
    result's."""

    id: str
    index: int | None = Field(default=None, description="its position in the sweep")
    group: int | None = Field(
        default=None, description="the position of its group in the view's group_details"
    )
    values: dict[str, Any]
    status: JobStatus
    steps_done: int
    loss: float | None
    final_loss: float | None
    val_loss: float | None = None
    final_val_loss: float | None = None


class HalvingCut(BaseModel):
    """Successive halving at one rung of one group: how many members it ranked, how many
    went on (the others ended pruned)."""

    step: int = Field(description="the rung: members ranked by the metric of step - 1")
    ranked: int
    kept: int


class SweepGroup(BaseModel):
    """A unit of work of a sweep: members trained together by one batched step on one worker.
    Successive halving ranks within a group: each keeps its own winners."""

    id: str
    status: JobStatus
    members: int = Field(description="its members, in all")
    steps_done: int
    rungs: list[HalvingCut] = Field(
        default_factory=list, description="the rungs at which it pruned members, in order"
    )


class SweepBest(BaseModel):
    """The succeeded member with the lowest final metric (final_loss, or final_val_loss for
    metric val_loss; equal within GRADSTREAM_RANK_RTOL: the first member)."""

    id: str
    values: dict[str, Any]
    final_loss: float
    final_val_loss: float | None = None


class SweepView(BaseModel):
    """A sweep as clients see it."""

    id: str
    name: str | None
    status: SweepStatus
    spec: SweepSpec
    created_at: UtcTime
    started_at: UtcTime | None
    finished_at: UtcTime | None
    counts: dict[JobStatus, int] = Field(description="members per status (all of them)")
    groups: int = Field(description="units of work: members trained together by one step")
    group_details: list[SweepGroup] = Field(
        default_factory=list, description="each group, with its own halving (in order)"
    )
    member_count: int = Field(default=0, description="its members, in all")
    members: list[SweepMember] = Field(
        description="a page of its members, in member order (`members_limit`, `members_cursor`)"
    )
    members_next: str | None = Field(
        default=None, description="`members_cursor` of the next page; null on the last"
    )
    best: SweepBest | None = Field(description="of all members, whatever the page")


class SweepSummary(BaseModel):
    """A sweep as listings and its stream's `done` event show it (DESIGN §10): the spec with
    inline data as `{"inline": {"samples": n, "features": d}}`, no member list
    (GET /v1/sweeps/{id} has both)."""

    id: str
    name: str | None
    status: SweepStatus
    spec: dict[str, Any]
    created_at: UtcTime
    started_at: UtcTime | None
    finished_at: UtcTime | None
    counts: dict[JobStatus, int] = Field(description="members per status")
    groups: int = Field(description="units of work: members trained together by one step")
    member_count: int = Field(description="its members, in all")
    best: SweepBest | None


class SweepList(BaseModel):
    sweeps: list[SweepSummary]
    next: str | None

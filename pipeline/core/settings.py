"""The config models every layer shares: the strict base model and the ``run`` and ``ray`` sections."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(StrictModel):
    name: str = Field("run", min_length=1, description="Names the default run folder runs/<name>.")
    seed: int = Field(0, ge=0, description="Seeds every random choice in the run.")


class RayConfig(StrictModel):
    address: str | None = Field(None, description="Cluster address; null = RAY_ADDRESS or a local cluster.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local cluster (ignored with an address).")
    ship_code: bool = Field(
        False,
        description="Ship the pipeline/ and stages/ packages to the cluster's workers through "
        "runtime_env py_modules (for clusters that do not have the project installed).",
    )
    ship_credentials: bool = Field(
        False,
        description="Joining a cluster by address: also send AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and "
        "AWS_SESSION_TOKEN from this process to its workers in the job's runtime_env (readable by whoever can "
        "list the cluster's jobs). The endpoint and region variables are always sent; off, the nodes need "
        "credentials of their own (an instance role, or the variables set where `ray start` ran).",
    )
    node_loss_retries: int = Field(
        2, ge=0,
        description="Times a stage that lost a Ray node mid-run is run again from its cached input on the nodes "
        "that are left (0: the run fails; rerun it to resume).",
    )
    node_loss_stall_seconds: float = Field(
        120.0, ge=0,
        description="After a node the stage started with has died, interrupt and retry the stage once it has "
        "written no rows for this long (Ray's own recovery can wait forever for resources the survivors hold); "
        "0 turns the watchdog off.",
    )

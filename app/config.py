"""Every setting of the service, read once from `FITPROBE_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict
from typing import Annotated

from fitprobe.app.http_hygiene import default_allowed_hosts
from fitprobe.probe.settings import OperatorSettings, comma_separated

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


class Settings(OperatorSettings):
    """The operator's settings the command line shares (allowed factories, model limits, CPU capacity:
    probe/settings.py), and the service's own."""

    model_config = SettingsConfigDict(env_prefix="FITPROBE_")

    data_dir: Path = Field(Path("./fitprobe-data"), description="where the SQLite database lives")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default sqlite:///<data_dir>/fitprobe.db "
        "(postgresql+psycopg://user:password@host/db for replicas)"
    )
    host: str = Field("127.0.0.1", description="address to bind; beyond loopback it needs FITPROBE_API_TOKENS")
    port: int = Field(8000, description="TCP port to listen on")
    api_tokens: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated bearer tokens; empty = no auth (loopback only)"
    )
    allow_public_bind: bool = Field(False, description="bind beyond loopback without tokens (not recommended)")
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated Host names requests may carry (any port; * for any), "
        "against DNS rebinding; default: the bind address, localhost, 127.0.0.1 and [::1]")
    header_timeout_s: float = Field(30.0, gt=0, description="a request line and headers that take longer to "
                                    "arrive are answered 408 and the connection closed")
    body_timeout_s: float = Field(30.0, gt=0, description="a request body that takes longer to arrive (from the "
                                  "end of its headers) is answered 408 and the connection closed")
    hub_access: Literal["offline", "online"] = Field(
        "offline", description="model: hf:org/name; offline: configs already in this server's Hugging Face cache "
        "(HF_HUB_CACHE) only; online: the server may fetch config.json from the Hub (HF_TOKEN for gated models)",
    )
    max_queued_jobs: int = Field(32, ge=1, description="queued jobs beyond this are refused with 429")
    job_timeout_s: float = Field(3600.0, gt=0, description="a job running longer is killed and failed")
    scratch_dir: str | None = Field(
        None, description="where each job process gets a temporary directory of its own (its TMPDIR: rank result "
        "files, compiler caches), removed when the job ends however it ends; default: the system's temp directory")
    max_seq_len: int = Field(32_768, ge=1, description="largest seq_len a request may ask for")
    max_effective_batch: int = Field(65_536, ge=1, description="largest effective_batch a request may ask for")
    model_build_timeout_s: float = Field(
        20.0, gt=0, description="a config (inline or hf:) is built on the meta device at submit to count its "
        "parameters; one that takes longer (thousands of layers) is refused with 422")
    max_whatif_seq_lens: int = Field(8, ge=1, description="most seq_lens (columns) a what-if table may ask for")
    max_whatif_cells: int = Field(
        144, ge=1, description="most cells (settings × seq_lens) a what-if table may ask for; each cell is one "
        "estimated probe, and each row adds its longest-sequence search (144: the default 36 rows at 4 seq_lens)")
    max_recommend_candidates: int = Field(
        96, ge=1, description="most candidates a recommendation may estimate (the product of the settings its "
        "request leaves room for: 96 is every saver for full fine-tuning on several devices)")
    max_body_bytes: int = Field(256 * 1024, description="largest request body")
    poll_interval_s: float = Field(0.2, gt=0, description="how often workers look for queued jobs")
    max_verify_processes: int = Field(
        4, ge=1, description="largest num_devices a job may run as processes on the CPU device (one per device: "
        "a verification, or a measured sharded trial); beyond it a request is a 422, estimate mode stays allowed")
    max_event_streams: int = Field(100, ge=1, description="open event streams beyond this are refused with 429")

    # ---- sharing the service: per client (its bearer token; without tokens, its network) -------
    client_header: str | None = Field(
        None, description="without tokens, read the client's address from this header (e.g. X-Forwarded-For, its "
        "last entry) instead of the connection's: only behind a proxy that sets it; addresses group by /24 "
        "(IPv4), /64 (IPv6) and loopback as one client")
    max_jobs_per_client: int = Field(8, ge=1, description="queued + running jobs one client may hold; beyond, 429")
    max_streams_per_client: int = Field(
        16, ge=1, description="event streams and waiting pre-flights one client may hold open; beyond, 429")
    max_submits_per_client_per_minute: int = Field(
        120, ge=1, description="stored submits (queued or answered from the cache) one client may make in any "
        "60 s; beyond, 429")
    max_plans_per_client_per_minute: int = Field(
        60, ge=1, description="synchronous plans (POST /v1/plans) one client may ask for in any 60 s; beyond, 429")

    # ---- keeping the disk bounded: the periodic sweep of finished jobs -------------------------
    retention_days: float = Field(30.0, gt=0, description="finished jobs older than this are deleted")
    max_stored_jobs: int = Field(10_000, ge=1, description="beyond this many stored jobs, the oldest finished "
                                                           "ones are deleted")
    max_stored_bytes: int = Field(1 << 30, ge=1, description="beyond this many bytes of stored specs and results, "
                                  "the oldest finished jobs are deleted (a row with a data profile is ~0.4 MB)")
    sweep_interval_s: float = Field(300.0, gt=0, description="how often the retention sweep runs")
    shutdown_grace_s: float = Field(5.0, ge=0, description="how long a stopping server waits for open requests")
    access_log: bool = Field(True, description="one log line per request; off, a 304 poll takes about a third "
                                               "less time (200 open dashboards poll 200 times a second)")

    # ---- scale out: where jobs run (app/executors/: local.py, ray.py) --------------------------
    executor: Literal["local", "ray"] = Field(
        "local", description="local: one worker per device of this machine, each job in a subprocess; "
        "ray: each job a Ray task on the cluster at FITPROBE_RAY_ADDRESS (pip install 'fitprobe[ray]')")
    ray_address: str | None = Field(
        None, description="the Ray cluster to join (host:port of its head, or auto); default: join the one "
        "started on this machine with `ray start`, else start one here with a fitprobe_device per local device")
    ray_accelerator_type: str | None = Field(
        None, description="the GPU type every job asks Ray for (e.g. H100): on a cluster of mixed cards it keeps "
        "a job, and the cached result it answers later requests with, on one kind of card")

    # ---- replicas sharing one database (PostgreSQL) ----
    lease_s: float = Field(
        30.0, gt=0, description="a running job's worker renews its lease every third of this; a job whose "
        "lease runs out (its replica died) is re-queued by another replica")

    @field_validator("api_tokens", "allowed_hosts", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return comma_separated(value)

    @property
    def resolved_allowed_hosts(self) -> list[str]:
        return self.allowed_hosts or default_allowed_hosts(self.host)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'fitprobe.db'}"

    def check_bind(self) -> None:
        """Refuse to serve the network without tokens: anyone could run jobs on the GPU."""
        if self.host not in LOOPBACK_HOSTS and not self.api_tokens and not self.allow_public_bind:
            raise SystemExit(
                f"fitprobe: refusing to bind {self.host} without FITPROBE_API_TOKENS; set tokens, bind "
                "127.0.0.1, or set FITPROBE_ALLOW_PUBLIC_BIND=true"
            )

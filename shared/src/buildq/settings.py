"""Configuration, read from the environment with the ``BUILDQ_`` prefix.

The AWS endpoint is deliberately *not* a buildq setting: botocore reads the
standard ``AWS_ENDPOINT_URL`` itself, so the same code talks to moto,
LocalStack or AWS without knowing which.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import uuid
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from buildq.clock import CLOCK_MARGIN_SECONDS


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Settings(BaseSettings):
    """Settings every buildq process shares: resources, AWS client tuning, logging."""

    model_config = SettingsConfigDict(env_prefix="BUILDQ_", extra="ignore", frozen=True)

    table_name: str = Field("buildq-projects", description="DynamoDB table for projects")
    queue_name: str = Field("buildq-builds", description="SQS build queue")
    dlq_name: str = Field("buildq-builds-dlq", description="SQS dead-letter queue")
    aws_region: str = Field(
        "us-east-1",
        validation_alias=AliasChoices("BUILDQ_AWS_REGION", "AWS_REGION", "AWS_DEFAULT_REGION"),
        description="AWS region (the standard AWS_REGION is honoured)",
    )
    aws_connect_timeout: float = Field(2.0, gt=0, description="botocore connect timeout, s")
    aws_read_timeout: float = Field(
        30.0, gt=0, description="botocore read timeout, s (above the 20 s long poll)"
    )
    aws_max_attempts: int = Field(
        3, ge=1, description="Attempts per AWS call while AWS is unavailable"
    )
    aws_retry_seconds: float = Field(
        10.0, gt=0, description="Time budget for retrying one AWS call, s"
    )
    aws_max_pool_connections: int = Field(50, ge=1, description="HTTP connections per client")

    max_attempts: int = Field(
        3, ge=1, description="Workflow attempts before a project is FAILED and dead-lettered"
    )
    workflows: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Extra workflows to register, comma-separated `module:attribute` paths",
    )

    dlq_hold_seconds: int = Field(
        60,
        ge=1,
        le=43200,
        description="How long `buildq dlq` hides a message it is working on (back at once "
        "when done; after this if the command dies)",
    )
    log_level: str = Field("INFO", description="Log level")
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto = pretty on a terminal, JSON otherwise"
    )

    @field_validator("workflows", mode="before")
    @classmethod
    def _split_paths(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value


class ApiSettings(Settings):
    """Settings of the API service."""

    # An API answers fast or says 503: short timeouts and a ~2 s retry budget.
    aws_connect_timeout: float = Field(1.0, gt=0, description="botocore connect timeout, s")
    aws_read_timeout: float = Field(5.0, gt=0, description="botocore read timeout, s")
    aws_retry_seconds: float = Field(
        1.5, gt=0, description="Time budget for retrying one AWS call, s"
    )

    api_host: str = Field("127.0.0.1", description="API bind address")
    api_port: int = Field(8000, ge=1, le=65535, description="API port")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="Largest accepted request body")
    api_keys: SecretStr = Field(
        SecretStr(""),
        description="Static API keys, comma-separated `key=tenant` pairs (local runs); "
        "production keys live hashed in the table (`buildq api-key create`)",
    )
    api_key_cache_seconds: float = Field(
        30.0, ge=0, description="How long the API trusts a key it looked up, s"
    )
    cursor_secret: SecretStr = Field(
        default_factory=lambda: SecretStr(secrets.token_hex(32)),
        description="Signs list cursors; set the same value on every API instance",
    )
    long_poll_interval: float = Field(
        0.5, gt=0, description="How often a long-polled project is re-read, s"
    )

    def static_api_keys(self) -> dict[str, str]:
        """``{sha256(key): tenant}`` of ``api_keys``; keys are never kept in clear."""
        keys: dict[str, str] = {}
        for pair in self.api_keys.get_secret_value().split(","):
            key, sep, tenant = pair.strip().partition("=")
            if not pair.strip():
                continue
            if not sep or not key or not tenant:
                raise ValueError("BUILDQ_API_KEYS must be comma-separated key=tenant pairs")
            keys[hash_api_key(key)] = tenant
        return keys


class WorkerSettings(Settings):
    """Settings of the worker service."""

    @model_validator(mode="after")
    def _lease_expires_before_redelivery(self) -> WorkerSettings:
        # A crashed worker's message must reappear only after its lease has
        # expired, or the next worker would see a live lease and drop it.
        if self.lease_seconds >= self.visibility_timeout:
            raise ValueError(
                f"lease_seconds ({self.lease_seconds}) must be below "
                f"visibility_timeout ({self.visibility_timeout})"
            )
        return self

    worker_id: str = Field(default_factory=default_worker_id, description="Unique worker id")
    max_workflow_workers: int = Field(
        5, ge=1, le=100, description="Workflows one worker process runs at once"
    )
    receive_wait_seconds: int = Field(20, ge=0, le=20, description="SQS long-poll wait")
    visibility_timeout: int = Field(
        60, ge=1, le=43200, description="Visibility timeout set at receive, s"
    )
    lease_seconds: int = Field(
        45, ge=1, description="Project lease length, s; below the visibility timeout"
    )
    clock_margin_seconds: float = Field(
        CLOCK_MARGIN_SECONDS,
        ge=0,
        description="A lease is taken over only this long past its expiry, s: it covers how "
        "far two processes' estimates of AWS's clock may differ (with lease + this below "
        "the visibility timeout, a dead worker's message comes back claimable)",
    )
    stage_timeout: float = Field(3600.0, gt=0, description="Default per-stage timeout, s")
    workflow_timeout: float = Field(
        86400.0, gt=0, description="Default timeout of one attempt of a whole workflow, s"
    )
    max_message_hold: float = Field(
        41400.0,
        gt=0,
        description="Hold a message this long at most (SQS caps it at 12 h), then run on the "
        "lease alone, s",
    )
    sweep_queued_after: float = Field(
        300.0, gt=0, description="A QUEUED project is re-enqueued by the sweeper after this, s"
    )
    sweep_building_after: float = Field(
        60.0, gt=0, description="A BUILDING project is re-enqueued this long past its lease, s"
    )
    sweep_interval: float = Field(
        30.0, gt=0, description="How often a worker tries to run the sweeper, s"
    )
    presence_interval: float = Field(
        10.0, gt=0, description="How often a worker refreshes its entry in `buildq workers`, s"
    )
    metrics_host: str = Field("127.0.0.1", description="Bind address of /metrics and /healthz")
    metrics_port: int = Field(
        9102, ge=0, le=65535, description="Port of the worker's /metrics and /healthz (0: off)"
    )
    loop_lag_warning: float = Field(0.5, gt=0, description="Log event-loop lag above this, s")
    retry_base_seconds: float = Field(
        2.0, ge=0, description="Backoff before a retry: base, doubled per attempt, jittered"
    )
    retry_cap_seconds: float = Field(300.0, ge=0, description="Longest backoff before a retry")
    missing_project_retries: int = Field(
        5, ge=0, description="Receives of a message whose project is missing before it is DLQ'd"
    )
    drain_seconds: float = Field(
        90.0, ge=0, description="On SIGTERM, how long running workflows may finish"
    )
    sync_stage_grace_seconds: float = Field(
        20.0,
        gt=0,
        description="How long a stopped sync stage's thread may take to return (the run "
        "keeps its lease meanwhile) before the worker exits (crash-only), s",
    )

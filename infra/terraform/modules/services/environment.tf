# What the containers get. Every name is a buildq setting: BUILDQ_ + the field name
# in shared/src/buildq/settings.py (Settings, ApiSettings, WorkerSettings); a test
# checks them. The AWS endpoint is the SDK's default, and credentials come from the
# task role.

locals {
  common_environment = {
    BUILDQ_TABLE_NAME   = var.table_name
    BUILDQ_QUEUE_NAME   = var.queue_name
    BUILDQ_DLQ_NAME     = var.dlq_name
    BUILDQ_AWS_REGION   = var.aws_region
    BUILDQ_MAX_ATTEMPTS = tostring(var.max_attempts)
    BUILDQ_WORKFLOWS    = join(",", var.workflows)
    BUILDQ_LOG_FORMAT   = "json"
  }

  api_environment = {
    BUILDQ_API_HOST = "0.0.0.0"
    BUILDQ_API_PORT = tostring(var.app_port)
  }

  # From SSM Parameter Store (SecureString), never in the task definition.
  api_secrets = {
    BUILDQ_CURSOR_SECRET = aws_ssm_parameter.cursor_secret.arn
  }

  worker_environment = {
    BUILDQ_MAX_WORKFLOW_WORKERS = tostring(var.max_workflow_workers)
    BUILDQ_METRICS_HOST         = "0.0.0.0"
    BUILDQ_METRICS_PORT         = tostring(local.worker_metrics_port)
    BUILDQ_DRAIN_SECONDS        = tostring(var.drain_seconds)
  }

  worker_metrics_port = 9102
  # Fargate's longest stop timeout: SIGTERM, BUILDQ_DRAIN_SECONDS of draining, the
  # hand-back of unfinished runs, then SIGKILL.
  worker_stop_timeout = 120
  api_stop_timeout    = 30

  # The CloudWatch Embedded Metric Format record the workers write (the sweeper's
  # lock holder, once per BUILDQ_SWEEP_INTERVAL): buildq_worker/sweeper.py, backlog_emf.
  emf_namespace        = "buildq"
  backlog_metric_name  = "BacklogPerWorkerSlot"
  backlog_dimension    = "QueueName"
  log_metric_namespace = "${var.name}/worker"

  # Both images have python and no curl.
  api_health_command    = "import urllib.request; urllib.request.urlopen('http://127.0.0.1:${var.app_port}/healthz', timeout=3)"
  worker_health_command = "import urllib.request; urllib.request.urlopen('http://127.0.0.1:${local.worker_metrics_port}/healthz', timeout=3)"
}

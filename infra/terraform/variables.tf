# Inputs of the buildq stack. Names follow the operators' vocabulary; each BUILDQ_*
# setting the containers get is named after the setting it feeds (README, Configuration).

variable "aws_region" {
  description = "AWS region to deploy into."
  type        = string
}

variable "name" {
  description = "Prefix of every resource name (table <name>-projects, queue <name>-builds, ...)."
  type        = string
  default     = "buildq"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,20}$", var.name))
    error_message = "name: 2-21 characters, lower-case letters, digits and dashes."
  }
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}

# -- network (an existing VPC) ----------------------------------------------------

variable "vpc_id" {
  description = "Existing VPC to run in."
  type        = string
}

variable "private_subnet_ids" {
  description = "Subnets of the tasks (API and workers): private, with a route to the AWS APIs (NAT gateway or VPC endpoints)."
  type        = list(string)
}

variable "public_subnet_ids" {
  description = "Subnets of the load balancer (public ones, or private ones when internal_alb is true)."
  type        = list(string)
}

variable "alb_ingress_cidrs" {
  description = "CIDR blocks allowed to reach the API on 443."
  type        = list(string)
}

variable "internal_alb" {
  description = "Make the load balancer internal (reachable only from inside the VPC)."
  type        = bool
  default     = false
}

variable "certificate_arn" {
  description = "ACM certificate of the HTTPS listener."
  type        = string
}

variable "api_domain_name" {
  description = "DNS name that points at the load balancer (yours to create); used in the api_url output."
  type        = string
  default     = null
}

variable "alb_access_logs_bucket" {
  description = "Existing S3 bucket for the load balancer's access logs (its policy must allow ELB log delivery); null turns them off."
  type        = string
  default     = null
}

variable "waf_web_acl_arn" {
  description = "Regional WAFv2 web ACL to put in front of the API; null for none."
  type        = string
  default     = null
}

# -- images ------------------------------------------------------------------------

variable "api_image_tag" {
  description = "Tag of the API image in its ECR repository (tags are immutable: use the git SHA)."
  type        = string
}

variable "worker_image_tag" {
  description = "Tag of the worker image in its ECR repository."
  type        = string
}

variable "cpu_architecture" {
  description = "CPU architecture the images are built for: X86_64 or ARM64."
  type        = string
  default     = "X86_64"

  validation {
    condition     = contains(["X86_64", "ARM64"], var.cpu_architecture)
    error_message = "cpu_architecture must be X86_64 or ARM64."
  }
}

# -- API service -------------------------------------------------------------------

variable "api_desired_count" {
  description = "API tasks to run; also the autoscaling minimum."
  type        = number
  default     = 2

  validation {
    condition     = var.api_desired_count >= 1
    error_message = "api_desired_count must be at least 1."
  }
}

variable "api_max_count" {
  description = "Most API tasks autoscaling may run."
  type        = number
  default     = 6
}

variable "api_cpu" {
  description = "CPU units of one API task (1024 = 1 vCPU)."
  type        = number
  default     = 512
}

variable "api_memory" {
  description = "Memory of one API task, MiB."
  type        = number
  default     = 1024
}

variable "api_cpu_target" {
  description = "Average CPU utilisation (%) the API service is scaled to."
  type        = number
  default     = 60
}

variable "cursor_secret" {
  description = "Signs list cursors (BUILDQ_CURSOR_SECRET); the same on every API task. Stored as an SSM SecureString."
  type        = string
  sensitive   = true

  validation {
    condition     = length(var.cursor_secret) >= 32
    error_message = "cursor_secret must be at least 32 characters (e.g. openssl rand -hex 32)."
  }
}

# -- worker service ----------------------------------------------------------------

variable "worker_min_count" {
  description = "Fewest worker tasks. At least 1: the workers themselves publish the backlog metric the service scales on."
  type        = number
  default     = 1

  validation {
    condition     = var.worker_min_count >= 1
    error_message = "worker_min_count must be at least 1: with no worker running, nobody publishes BacklogPerWorkerSlot and the service never scales out."
  }
}

variable "worker_max_count" {
  description = "Most worker tasks."
  type        = number
  default     = 10
}

variable "max_workflow_workers" {
  description = "Workflows one worker task runs at once (BUILDQ_MAX_WORKFLOW_WORKERS): its slots."
  type        = number
  default     = 5

  validation {
    condition     = var.max_workflow_workers >= 1 && var.max_workflow_workers <= 100
    error_message = "max_workflow_workers must be 1..100."
  }
}

variable "worker_cpu" {
  description = "CPU units of one worker task (1024 = 1 vCPU)."
  type        = number
  default     = 1024
}

variable "worker_memory" {
  description = "Memory of one worker task, MiB."
  type        = number
  default     = 2048
}

variable "worker_backlog_target" {
  description = "Target of BacklogPerWorkerSlot = waiting messages / live worker slots. 1.0 keeps about one waiting message per slot; lower scales out sooner."
  type        = number
  default     = 1.0

  validation {
    condition     = var.worker_backlog_target > 0
    error_message = "worker_backlog_target must be above 0."
  }
}

variable "max_attempts" {
  description = "Workflow attempts before a project is FAILED (BUILDQ_MAX_ATTEMPTS); the queue's redrive maxReceiveCount is this + 2."
  type        = number
  default     = 3

  validation {
    condition     = var.max_attempts >= 1
    error_message = "max_attempts must be at least 1."
  }
}

variable "drain_seconds" {
  description = "On SIGTERM, how long running workflows may finish before they are handed back (BUILDQ_DRAIN_SECONDS); below the 120 s stop timeout, with time left for the hand-back."
  type        = number
  default     = 90

  validation {
    condition     = var.drain_seconds >= 0 && var.drain_seconds <= 110
    error_message = "drain_seconds must be 0..110: ECS kills the worker 120 s after SIGTERM, and handing the runs back takes a few seconds."
  }
}

variable "workflows" {
  description = "Extra workflows (BUILDQ_WORKFLOWS), `module:attribute` paths, set on the API and the workers."
  type        = list(string)
  default     = []
}

# -- queue -------------------------------------------------------------------------

variable "queue_visibility_timeout_seconds" {
  description = "The build queue's default visibility timeout, s (workers set their own at receive)."
  type        = number
  default     = 60
}

variable "queue_message_retention_seconds" {
  description = "How long the build queue and the DLQ keep a message, s (the maximum, 14 days, gives on-call time to replay)."
  type        = number
  default     = 1209600
}

# -- logs and alarms ---------------------------------------------------------------

variable "log_retention_days" {
  description = "Retention of the API and worker log groups, days."
  type        = number
  default     = 365
}

variable "alarm_emails" {
  description = "E-mail addresses subscribed to the alarm topic (each must confirm)."
  type        = list(string)
  default     = []
}

variable "queue_age_alarm_seconds" {
  description = "Alarm when messages keep waiting and the oldest message is older than this, s."
  type        = number
  default     = 900
}

variable "api_5xx_alarm_percent" {
  description = "Alarm when more than this % of API requests answer 5xx, three minutes in a row."
  type        = number
  default     = 5
}

variable "name" {
  description = "Prefix of every resource name."
  type        = string
}

variable "aws_region" {
  description = "Region of the stack."
  type        = string
}

variable "account_id" {
  description = "AWS account id."
  type        = string
}

variable "partition" {
  description = "AWS partition (aws, aws-cn, aws-us-gov)."
  type        = string
}

variable "kms_key_arn" {
  description = "KMS key of the stack's data at rest."
  type        = string
}

variable "app_port" {
  description = "Port the API container listens on (BUILDQ_API_PORT)."
  type        = number
}

# -- network -----------------------------------------------------------------------

variable "vpc_id" {
  description = "VPC of the target group."
  type        = string
}

variable "private_subnet_ids" {
  description = "Subnets of the tasks."
  type        = list(string)
}

variable "public_subnet_ids" {
  description = "Subnets of the load balancer."
  type        = list(string)
}

variable "alb_security_group_id" {
  description = "Security group of the load balancer."
  type        = string
}

variable "api_security_group_id" {
  description = "Security group of the API tasks."
  type        = string
}

variable "worker_security_group_id" {
  description = "Security group of the worker tasks."
  type        = string
}

variable "internal_alb" {
  description = "Make the load balancer internal."
  type        = bool
}

variable "certificate_arn" {
  description = "ACM certificate of the HTTPS listener."
  type        = string
}

variable "api_domain_name" {
  description = "DNS name of the API, if any."
  type        = string
  default     = null
}

variable "alb_access_logs_bucket" {
  description = "S3 bucket of the access logs; null: off."
  type        = string
  default     = null
}

variable "waf_web_acl_arn" {
  description = "WAFv2 web ACL of the load balancer; null: none."
  type        = string
  default     = null
}

# -- images and sizes --------------------------------------------------------------

variable "api_image_tag" {
  description = "Tag of the API image."
  type        = string
}

variable "worker_image_tag" {
  description = "Tag of the worker image."
  type        = string
}

variable "cpu_architecture" {
  description = "X86_64 or ARM64."
  type        = string
}

variable "api_desired_count" {
  description = "API tasks; the autoscaling minimum."
  type        = number
}

variable "api_max_count" {
  description = "Most API tasks."
  type        = number
}

variable "api_cpu" {
  description = "CPU units of an API task."
  type        = number
}

variable "api_memory" {
  description = "Memory of an API task, MiB."
  type        = number
}

variable "api_cpu_target" {
  description = "Target average CPU (%) of the API service."
  type        = number
}

variable "cursor_secret" {
  description = "BUILDQ_CURSOR_SECRET of the API."
  type        = string
  sensitive   = true
}

variable "worker_min_count" {
  description = "Fewest worker tasks."
  type        = number
}

variable "worker_max_count" {
  description = "Most worker tasks."
  type        = number
}

variable "max_workflow_workers" {
  description = "BUILDQ_MAX_WORKFLOW_WORKERS: workflow slots per worker task."
  type        = number
}

variable "worker_cpu" {
  description = "CPU units of a worker task."
  type        = number
}

variable "worker_memory" {
  description = "Memory of a worker task, MiB."
  type        = number
}

variable "worker_backlog_target" {
  description = "Target of BacklogPerWorkerSlot."
  type        = number
}

variable "max_attempts" {
  description = "BUILDQ_MAX_ATTEMPTS."
  type        = number
}

variable "drain_seconds" {
  description = "BUILDQ_DRAIN_SECONDS of the workers."
  type        = number
}

variable "workflows" {
  description = "BUILDQ_WORKFLOWS, as a list."
  type        = list(string)
}

# -- data and queues ---------------------------------------------------------------

variable "table_name" {
  description = "Name of the projects table."
  type        = string
}

variable "table_arn" {
  description = "ARN of the projects table."
  type        = string
}

variable "sweep_index_arn" {
  description = "ARN of the sweeper's index."
  type        = string
}

variable "queue_name" {
  description = "Name of the build queue."
  type        = string
}

variable "queue_arn" {
  description = "ARN of the build queue."
  type        = string
}

variable "dlq_name" {
  description = "Name of the dead-letter queue."
  type        = string
}

variable "dlq_arn" {
  description = "ARN of the dead-letter queue."
  type        = string
}

# -- logs and alarms ---------------------------------------------------------------

variable "log_retention_days" {
  description = "Retention of the log groups, days."
  type        = number
}

variable "alarm_emails" {
  description = "E-mail subscribers of the alarm topic."
  type        = list(string)
}

variable "queue_age_alarm_seconds" {
  description = "Threshold of the oldest-message alarm, s."
  type        = number
}

variable "api_5xx_alarm_percent" {
  description = "Threshold of the API 5xx alarm, %."
  type        = number
}

variable "queue_name" {
  description = "Name of the build queue (BUILDQ_QUEUE_NAME)."
  type        = string
}

variable "dlq_name" {
  description = "Name of the dead-letter queue (BUILDQ_DLQ_NAME)."
  type        = string
}

variable "max_attempts" {
  description = "The workers' BUILDQ_MAX_ATTEMPTS; the redrive maxReceiveCount is this + 2."
  type        = number
}

variable "visibility_timeout_seconds" {
  description = "Default visibility timeout of the build queue, s."
  type        = number
  default     = 60

  validation {
    condition     = var.visibility_timeout_seconds >= 0 && var.visibility_timeout_seconds <= 43200
    error_message = "visibility_timeout_seconds must be 0..43200."
  }
}

variable "message_retention_seconds" {
  description = "Retention of both queues, s."
  type        = number
  default     = 1209600

  validation {
    condition     = var.message_retention_seconds >= 60 && var.message_retention_seconds <= 1209600
    error_message = "message_retention_seconds must be 60..1209600."
  }
}

variable "kms_key_arn" {
  description = "KMS key both queues are encrypted with."
  type        = string
}

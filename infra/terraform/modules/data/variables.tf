variable "table_name" {
  description = "Name of the projects table (BUILDQ_TABLE_NAME)."
  type        = string
}

variable "kms_key_arn" {
  description = "KMS key the table is encrypted with."
  type        = string
}

variable "deletion_protection" {
  description = "Refuse to delete the table."
  type        = bool
  default     = true
}

# The projects table: the same key schema, attributes, sweeper index and TTL
# attribute as `buildq bootstrap` (shared/src/buildq/resources.py, table_definition);
# tests/infra compares the two.

resource "aws_dynamodb_table" "projects" {
  name                        = var.table_name
  billing_mode                = "PAY_PER_REQUEST"
  hash_key                    = "pk"
  range_key                   = "sk"
  deletion_protection_enabled = var.deletion_protection

  attribute {
    name = "pk"
    type = "S"
  }

  attribute {
    name = "sk"
    type = "S"
  }

  attribute {
    name = "sweep_shard"
    type = "S"
  }

  attribute {
    name = "sweep_at"
    type = "N"
  }

  # Sparse: only QUEUED and BUILDING projects (and FAILED ones until the DLQ holds
  # their failure) carry sweep_shard, each status in shards of its own.
  global_secondary_index {
    name               = "sweep"
    hash_key           = "sweep_shard"
    range_key          = "sweep_at"
    projection_type    = "INCLUDE"
    non_key_attributes = ["tenant_id", "project_id", "status", "attempt", "lease_expires_at"]
  }

  # Idempotency keys and worker presence entries expire.
  ttl {
    attribute_name = "expires_at"
    enabled        = true
  }

  point_in_time_recovery {
    enabled = true
  }

  server_side_encryption {
    enabled     = true
    kms_key_arn = var.kms_key_arn
  }
}

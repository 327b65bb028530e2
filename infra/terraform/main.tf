# buildq on ECS Fargate: an API behind an ALB and a worker fleet scaled on the
# queue's backlog per worker slot, over one DynamoDB table and an SQS build queue
# with its dead-letter queue. Terraform creates every resource `buildq bootstrap`
# creates locally (same key schema, index and queue attributes: a test compares them).

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}

locals {
  account_id = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition
  app_port   = 8000
}

# One customer-managed key for the application's data at rest: the table, both
# queues, the log groups, the alarm topic, the images and the cursor secret.
resource "aws_kms_key" "buildq" {
  description             = "${var.name}: table, queues, logs, alarm topic, images, secrets"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.kms.json
}

resource "aws_kms_alias" "buildq" {
  name          = "alias/${var.name}"
  target_key_id = aws_kms_key.buildq.key_id
}

data "aws_iam_policy_document" "kms" {
  # A key policy, not an identity policy: its "*" resource is this key alone, and the
  # account root administering the key is AWS's default key policy (without it the key
  # could become unmanageable). Use of the key is granted by the roles' IAM policies.
  #checkov:skip=CKV_AWS_109: key policy; "*" is this key, the account root administers it (AWS default)
  #checkov:skip=CKV_AWS_111: key policy; "*" is this key, the account root administers it (AWS default)
  #checkov:skip=CKV_AWS_356: key policy; "*" is this key, the only resource a key policy can name
  # AWS's default key policy: the account administers the key, and IAM policies
  # (the task roles' kms:GenerateDataKey / kms:Decrypt) decide who uses it. In a key
  # policy, "*" as resource means this key.
  statement {
    sid       = "AccountAdministersTheKey"
    actions   = ["kms:*"]
    resources = ["*"]

    principals {
      type        = "AWS"
      identifiers = ["arn:${local.partition}:iam::${local.account_id}:root"]
    }
  }

  statement {
    sid = "CloudWatchLogsEncryptsTheLogGroups"
    actions = [
      "kms:Encrypt",
      "kms:Decrypt",
      "kms:ReEncryptFrom",
      "kms:ReEncryptTo",
      "kms:GenerateDataKey",
      "kms:GenerateDataKeyWithoutPlaintext",
      "kms:DescribeKey",
    ]
    resources = ["*"]

    principals {
      type        = "Service"
      identifiers = ["logs.${var.aws_region}.amazonaws.com"]
    }

    condition {
      test     = "ArnLike"
      variable = "kms:EncryptionContext:aws:logs:arn"
      values   = ["arn:${local.partition}:logs:${var.aws_region}:${local.account_id}:log-group:/${var.name}/*"]
    }
  }

  statement {
    sid       = "CloudWatchAlarmsPublishToTheEncryptedTopic"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = ["*"]

    principals {
      type        = "Service"
      identifiers = ["cloudwatch.amazonaws.com"]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

module "network" {
  source = "./modules/network"

  name               = var.name
  vpc_id             = var.vpc_id
  private_subnet_ids = var.private_subnet_ids
  public_subnet_ids  = var.public_subnet_ids
  alb_ingress_cidrs  = var.alb_ingress_cidrs
  app_port           = local.app_port
}

module "data" {
  source = "./modules/data"

  table_name  = "${var.name}-projects"
  kms_key_arn = aws_kms_key.buildq.arn
}

module "queue" {
  source = "./modules/queue"

  queue_name                 = "${var.name}-builds"
  dlq_name                   = "${var.name}-builds-dlq"
  max_attempts               = var.max_attempts
  visibility_timeout_seconds = var.queue_visibility_timeout_seconds
  message_retention_seconds  = var.queue_message_retention_seconds
  kms_key_arn                = aws_kms_key.buildq.arn
}

module "services" {
  source = "./modules/services"

  name        = var.name
  aws_region  = var.aws_region
  account_id  = local.account_id
  partition   = local.partition
  kms_key_arn = aws_kms_key.buildq.arn
  app_port    = local.app_port

  vpc_id                   = module.network.vpc_id
  private_subnet_ids       = module.network.private_subnet_ids
  public_subnet_ids        = module.network.public_subnet_ids
  alb_security_group_id    = module.network.alb_security_group_id
  api_security_group_id    = module.network.api_security_group_id
  worker_security_group_id = module.network.worker_security_group_id
  internal_alb             = var.internal_alb
  certificate_arn          = var.certificate_arn
  api_domain_name          = var.api_domain_name
  alb_access_logs_bucket   = var.alb_access_logs_bucket
  waf_web_acl_arn          = var.waf_web_acl_arn

  api_image_tag    = var.api_image_tag
  worker_image_tag = var.worker_image_tag
  cpu_architecture = var.cpu_architecture

  api_desired_count = var.api_desired_count
  api_max_count     = var.api_max_count
  api_cpu           = var.api_cpu
  api_memory        = var.api_memory
  api_cpu_target    = var.api_cpu_target
  cursor_secret     = var.cursor_secret

  worker_min_count      = var.worker_min_count
  worker_max_count      = var.worker_max_count
  max_workflow_workers  = var.max_workflow_workers
  worker_cpu            = var.worker_cpu
  worker_memory         = var.worker_memory
  worker_backlog_target = var.worker_backlog_target
  max_attempts          = var.max_attempts
  drain_seconds         = var.drain_seconds
  workflows             = var.workflows

  table_name      = module.data.table_name
  table_arn       = module.data.table_arn
  sweep_index_arn = module.data.sweep_index_arn
  queue_name      = module.queue.queue_name
  queue_arn       = module.queue.queue_arn
  dlq_name        = module.queue.dlq_name
  dlq_arn         = module.queue.dlq_arn

  log_retention_days      = var.log_retention_days
  alarm_emails            = var.alarm_emails
  queue_age_alarm_seconds = var.queue_age_alarm_seconds
  api_5xx_alarm_percent   = var.api_5xx_alarm_percent
}

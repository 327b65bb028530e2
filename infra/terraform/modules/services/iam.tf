# One task role per service with only what its code calls (shared/src/buildq/store.py
# and queue.py), the execution role ECS uses to pull images, write logs and read the
# cursor secret, and a separate policy for operators. No action wildcards; "*" as a
# resource only where AWS has nothing narrower (ecr:GetAuthorizationToken).

data "aws_iam_policy_document" "ecs_tasks_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ecs-tasks.amazonaws.com"]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [var.account_id]
    }

    condition {
      test     = "ArnLike"
      variable = "aws:SourceArn"
      values   = ["arn:${var.partition}:ecs:${var.aws_region}:${var.account_id}:*"]
    }
  }
}

# -- execution role: image pulls, logs, the cursor secret --------------------------

resource "aws_iam_role" "execution" {
  name               = "${var.name}-task-execution"
  description        = "ECS pulls ${var.name} images, writes their logs, reads the API's secret"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
}

data "aws_iam_policy_document" "execution" {
  statement {
    sid       = "EcrLogin"
    actions   = ["ecr:GetAuthorizationToken"]
    resources = ["*"] # AWS defines no resource for it
  }

  statement {
    sid = "PullTheServiceImages"
    actions = [
      "ecr:BatchCheckLayerAvailability",
      "ecr:BatchGetImage",
      "ecr:GetDownloadUrlForLayer",
    ]
    resources = [for repository in aws_ecr_repository.service : repository.arn]
  }

  statement {
    sid     = "WriteTheServiceLogs"
    actions = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = [
      "${aws_cloudwatch_log_group.api.arn}:log-stream:*",
      "${aws_cloudwatch_log_group.worker.arn}:log-stream:*",
    ]
  }

  statement {
    sid       = "ReadTheCursorSecret"
    actions   = ["ssm:GetParameters"]
    resources = [aws_ssm_parameter.cursor_secret.arn]
  }

  statement {
    sid       = "DecryptTheSecretAndImages"
    actions   = ["kms:Decrypt"]
    resources = [var.kms_key_arn]
  }
}

resource "aws_iam_role_policy" "execution" {
  name   = "pull-log-secrets"
  role   = aws_iam_role.execution.id
  policy = data.aws_iam_policy_document.execution.json
}

# -- API task role -----------------------------------------------------------------

resource "aws_iam_role" "api" {
  name               = "${var.name}-api"
  description        = "The ${var.name} API: writes projects, enqueues builds"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
}

data "aws_iam_policy_document" "api" {
  # create (PutItem; with an Idempotency-Key, TransactWriteItems, which IAM
  # authorises as PutItem), get, list (Query), cancel (UpdateItem), API-key look-up
  # (GetItem), /readyz (DescribeTable).
  statement {
    sid = "ProjectsTable"
    actions = [
      "dynamodb:DescribeTable",
      "dynamodb:GetItem",
      "dynamodb:PutItem",
      "dynamodb:Query",
      "dynamodb:UpdateItem",
    ]
    resources = [var.table_arn]
  }

  # Send only: receiving and deleting are the workers' job.
  statement {
    sid = "EnqueueBuilds"
    actions = [
      "sqs:GetQueueAttributes",
      "sqs:GetQueueUrl",
      "sqs:SendMessage",
    ]
    resources = [var.queue_arn]
  }

  # The queue adapter resolves both queue URLs up front.
  statement {
    sid       = "ResolveTheDeadLetterQueueUrl"
    actions   = ["sqs:GetQueueUrl"]
    resources = [var.dlq_arn]
  }

  # The queue is encrypted with the stack's key: a sender makes data keys.
  statement {
    sid       = "EncryptedQueue"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [var.kms_key_arn]
  }
}

resource "aws_iam_role_policy" "api" {
  name   = "api"
  role   = aws_iam_role.api.id
  policy = data.aws_iam_policy_document.api.json
}

# -- worker task role --------------------------------------------------------------

resource "aws_iam_role" "worker" {
  name               = "${var.name}-worker"
  description        = "The ${var.name} workers: run builds from the queue"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
}

data "aws_iam_policy_document" "worker" {
  # claim / stage writes / finish / lease (UpdateItem), reads (GetItem), sweeper lock
  # and presence entries (PutItem, DeleteItem), live workers (Query).
  statement {
    sid = "ProjectsTable"
    actions = [
      "dynamodb:DeleteItem",
      "dynamodb:GetItem",
      "dynamodb:PutItem",
      "dynamodb:Query",
      "dynamodb:UpdateItem",
    ]
    resources = [var.table_arn]
  }

  # The sweeper reads only its sparse index.
  statement {
    sid       = "SweeperIndex"
    actions   = ["dynamodb:Query"]
    resources = [var.sweep_index_arn]
  }

  statement {
    sid = "ConsumeBuilds"
    actions = [
      "sqs:ChangeMessageVisibility",
      "sqs:DeleteMessage",
      "sqs:GetQueueAttributes",
      "sqs:GetQueueUrl",
      "sqs:ReceiveMessage",
      "sqs:SendMessage",
    ]
    resources = [var.queue_arn]
  }

  # Dead-letter failures with their reason; the sweeper reads the DLQ's depth.
  statement {
    sid = "DeadLetter"
    actions = [
      "sqs:GetQueueAttributes",
      "sqs:GetQueueUrl",
      "sqs:SendMessage",
    ]
    resources = [var.dlq_arn]
  }

  statement {
    sid       = "EncryptedQueues"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [var.kms_key_arn]
  }

  # The ECS agent sets scale-in protection with the task role's credentials.
  statement {
    sid       = "OwnTaskScaleInProtection"
    actions   = ["ecs:GetTaskProtection", "ecs:UpdateTaskProtection"]
    resources = ["arn:${var.partition}:ecs:${var.aws_region}:${var.account_id}:task/${aws_ecs_cluster.this.name}/*"]
  }
}

resource "aws_iam_role_policy" "worker" {
  name   = "worker"
  role   = aws_iam_role.worker.id
  policy = data.aws_iam_policy_document.worker.json
}

# -- operators ---------------------------------------------------------------------

# For people (or a CI job) running the buildq CLI against this stack: api-key
# create/revoke, dlq list/show/replay/purge, queue stats, projects get/list/replay,
# workers. Not attached to anything: attach it to the operators' role. `buildq
# bootstrap` is not needed here (Terraform creates the resources) and has no rights.
resource "aws_iam_policy" "ops" {
  name        = "${var.name}-ops"
  description = "Operate ${var.name} with the buildq CLI"
  policy      = data.aws_iam_policy_document.ops.json
}

data "aws_iam_policy_document" "ops" {
  statement {
    sid = "ProjectsTable"
    actions = [
      "dynamodb:DeleteItem",
      "dynamodb:DescribeTable",
      "dynamodb:GetItem",
      "dynamodb:PutItem",
      "dynamodb:Query",
      "dynamodb:Scan",
      "dynamodb:UpdateItem",
    ]
    resources = [var.table_arn, var.sweep_index_arn]
  }

  statement {
    sid = "Queues"
    actions = [
      "sqs:ChangeMessageVisibility",
      "sqs:DeleteMessage",
      "sqs:GetQueueAttributes",
      "sqs:GetQueueUrl",
      "sqs:ReceiveMessage",
      "sqs:SendMessage",
    ]
    resources = [var.queue_arn, var.dlq_arn]
  }

  statement {
    sid       = "EncryptedQueues"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [var.kms_key_arn]
  }
}

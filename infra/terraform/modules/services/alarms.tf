# Alarms, all to one SNS topic: the DLQ is not empty, messages keep waiting, the API
# answers 5xx, workers lose leases or fail their lease heartbeats (from their JSON
# logs: events project.lease_lost and heartbeat.lease_failed).

resource "aws_sns_topic" "alarms" {
  name              = "${var.name}-alarms"
  kms_master_key_id = var.kms_key_arn
}

resource "aws_sns_topic_subscription" "email" {
  for_each = toset(var.alarm_emails)

  topic_arn = aws_sns_topic.alarms.arn
  protocol  = "email"
  endpoint  = each.value
}

resource "aws_cloudwatch_metric_alarm" "dlq_not_empty" {
  alarm_name          = "${var.name}-dlq-not-empty"
  alarm_description   = "Messages in the dead-letter queue: FAILED projects or poison messages. `buildq dlq list` shows why; `buildq dlq replay` retries."
  namespace           = "AWS/SQS"
  metric_name         = "ApproximateNumberOfMessagesVisible"
  dimensions          = { QueueName = var.dlq_name }
  statistic           = "Maximum"
  period              = 300
  evaluation_periods  = 1
  comparison_operator = "GreaterThanThreshold"
  threshold           = 0
  treat_missing_data  = "notBreaching"
  alarm_actions       = [aws_sns_topic.alarms.arn]
  ok_actions          = [aws_sns_topic.alarms.arn]
}

# SQS's age of the oldest message counts messages held by running workflows too, so
# it alone would fire on every long build: alarm only while messages also kept
# waiting (visible) for the whole period, i.e. the workers are not keeping up.
resource "aws_cloudwatch_metric_alarm" "queue_backlog_age" {
  alarm_name          = "${var.name}-queue-oldest-message"
  alarm_description   = "Messages keep waiting and the oldest is over ${var.queue_age_alarm_seconds} s old: workers are missing, stuck or at worker_max_count. `buildq queue stats`, `buildq workers`."
  comparison_operator = "GreaterThanThreshold"
  threshold           = var.queue_age_alarm_seconds
  evaluation_periods  = 2
  treat_missing_data  = "notBreaching"
  alarm_actions       = [aws_sns_topic.alarms.arn]
  ok_actions          = [aws_sns_topic.alarms.arn]

  metric_query {
    id          = "waiting_age"
    expression  = "IF(visible > 0, age, 0)"
    label       = "Age of the oldest message while messages wait"
    return_data = true
  }

  metric_query {
    id = "age"
    metric {
      namespace   = "AWS/SQS"
      metric_name = "ApproximateAgeOfOldestMessage"
      dimensions  = { QueueName = var.queue_name }
      stat        = "Maximum"
      period      = 300
    }
  }

  metric_query {
    id = "visible"
    metric {
      namespace   = "AWS/SQS"
      metric_name = "ApproximateNumberOfMessagesVisible"
      dimensions  = { QueueName = var.queue_name }
      stat        = "Minimum"
      period      = 300
    }
  }
}

resource "aws_cloudwatch_metric_alarm" "api_5xx_rate" {
  alarm_name          = "${var.name}-api-5xx-rate"
  alarm_description   = "Over ${var.api_5xx_alarm_percent}% of API requests answered 5xx for 3 minutes (503 = DynamoDB or SQS unreachable; ELB 5xx = no healthy task)."
  comparison_operator = "GreaterThanThreshold"
  threshold           = var.api_5xx_alarm_percent
  evaluation_periods  = 3
  datapoints_to_alarm = 3
  treat_missing_data  = "notBreaching"
  alarm_actions       = [aws_sns_topic.alarms.arn]
  ok_actions          = [aws_sns_topic.alarms.arn]

  metric_query {
    id          = "error_rate"
    expression  = "100 * (FILL(target_5xx, 0) + FILL(elb_5xx, 0)) / requests"
    label       = "API 5xx, % of requests"
    return_data = true
  }

  metric_query {
    id = "target_5xx"
    metric {
      namespace   = "AWS/ApplicationELB"
      metric_name = "HTTPCode_Target_5XX_Count"
      dimensions  = { LoadBalancer = aws_lb.api.arn_suffix }
      stat        = "Sum"
      period      = 60
    }
  }

  metric_query {
    id = "elb_5xx"
    metric {
      namespace   = "AWS/ApplicationELB"
      metric_name = "HTTPCode_ELB_5XX_Count"
      dimensions  = { LoadBalancer = aws_lb.api.arn_suffix }
      stat        = "Sum"
      period      = 60
    }
  }

  metric_query {
    id = "requests"
    metric {
      namespace   = "AWS/ApplicationELB"
      metric_name = "RequestCount"
      dimensions  = { LoadBalancer = aws_lb.api.arn_suffix }
      stat        = "Sum"
      period      = 60
    }
  }
}

locals {
  # Worker log events worth waking someone for, by metric name.
  worker_log_alarms = {
    LeaseLost = {
      event       = "project.lease_lost"
      description = "A worker found another worker holding its project and stopped (a stalled worker or a lease shorter than a stall)."
    }
    HeartbeatLeaseFailed = {
      event       = "heartbeat.lease_failed"
      description = "Lease heartbeats failed: DynamoDB errors or throttling; runs may lose their lease."
    }
  }
}

resource "aws_cloudwatch_log_metric_filter" "worker" {
  for_each = local.worker_log_alarms

  name           = "${var.name}-worker-${each.key}"
  log_group_name = aws_cloudwatch_log_group.worker.name
  pattern        = "{ $.event = \"${each.value.event}\" }"

  metric_transformation {
    name          = each.key
    namespace     = local.log_metric_namespace
    value         = "1"
    default_value = "0"
  }
}

resource "aws_cloudwatch_metric_alarm" "worker" {
  for_each = local.worker_log_alarms

  alarm_name          = "${var.name}-worker-${each.key}"
  alarm_description   = "${each.value.description} Logs: event ${each.value.event} in ${aws_cloudwatch_log_group.worker.name}."
  namespace           = local.log_metric_namespace
  metric_name         = aws_cloudwatch_log_metric_filter.worker[each.key].metric_transformation[0].name
  statistic           = "Sum"
  period              = 300
  evaluation_periods  = 1
  comparison_operator = "GreaterThanOrEqualToThreshold"
  threshold           = 1
  treat_missing_data  = "notBreaching"
  alarm_actions       = [aws_sns_topic.alarms.arn]
  ok_actions          = [aws_sns_topic.alarms.arn]
}

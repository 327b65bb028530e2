# The API scales on CPU. The workers scale on BacklogPerWorkerSlot, which they
# publish themselves (EMF, namespace buildq, dimension QueueName): messages waiting in
# the build queue / live worker slots, where a worker task has max_workflow_workers
# slots. Target tracking keeps it near worker_backlog_target: with a target of 1.0
# and 5 slots per task, 50 waiting messages ask for 10 tasks. Scale-in only stops
# tasks that are not protected, and a worker protects its task while it runs
# workflows.

resource "aws_appautoscaling_target" "api" {
  service_namespace  = "ecs"
  resource_id        = "service/${aws_ecs_cluster.this.name}/${aws_ecs_service.api.name}"
  scalable_dimension = "ecs:service:DesiredCount"
  min_capacity       = var.api_desired_count
  max_capacity       = var.api_max_count
}

resource "aws_appautoscaling_policy" "api_cpu" {
  name               = "${var.name}-api-cpu"
  policy_type        = "TargetTrackingScaling"
  service_namespace  = aws_appautoscaling_target.api.service_namespace
  resource_id        = aws_appautoscaling_target.api.resource_id
  scalable_dimension = aws_appautoscaling_target.api.scalable_dimension

  target_tracking_scaling_policy_configuration {
    target_value       = var.api_cpu_target
    scale_in_cooldown  = 300
    scale_out_cooldown = 60

    predefined_metric_specification {
      predefined_metric_type = "ECSServiceAverageCPUUtilization"
    }
  }
}

resource "aws_appautoscaling_target" "worker" {
  service_namespace  = "ecs"
  resource_id        = "service/${aws_ecs_cluster.this.name}/${aws_ecs_service.worker.name}"
  scalable_dimension = "ecs:service:DesiredCount"
  min_capacity       = var.worker_min_count
  max_capacity       = var.worker_max_count
}

resource "aws_appautoscaling_policy" "worker_backlog" {
  name               = "${var.name}-worker-backlog-per-slot"
  policy_type        = "TargetTrackingScaling"
  service_namespace  = aws_appautoscaling_target.worker.service_namespace
  resource_id        = aws_appautoscaling_target.worker.resource_id
  scalable_dimension = aws_appautoscaling_target.worker.scalable_dimension

  target_tracking_scaling_policy_configuration {
    target_value       = var.worker_backlog_target
    scale_out_cooldown = 60
    # New workers pick up the backlog within a receive; do not flap.
    scale_in_cooldown = 300

    customized_metric_specification {
      namespace   = local.emf_namespace
      metric_name = local.backlog_metric_name
      statistic   = "Average"
      unit        = "None"

      dimensions {
        name  = local.backlog_dimension
        value = var.queue_name
      }
    }
  }
}

output "api_url" {
  description = "Base URL of the API."
  value       = "https://${coalesce(var.api_domain_name, aws_lb.api.dns_name)}"
}

output "alb_dns_name" {
  description = "DNS name of the load balancer."
  value       = aws_lb.api.dns_name
}

output "ecr_repository_urls" {
  description = "ECR repository URL by service."
  value       = { for service, repository in aws_ecr_repository.service : service => repository.repository_url }
}

output "cluster_name" {
  description = "ECS cluster."
  value       = aws_ecs_cluster.this.name
}

output "service_names" {
  description = "ECS service name by service."
  value       = { api = aws_ecs_service.api.name, worker = aws_ecs_service.worker.name }
}

output "ops_policy_arn" {
  description = "The operators' policy."
  value       = aws_iam_policy.ops.arn
}

output "alarm_topic_arn" {
  description = "The alarm topic."
  value       = aws_sns_topic.alarms.arn
}

output "log_group_names" {
  description = "Log group by service."
  value       = { api = aws_cloudwatch_log_group.api.name, worker = aws_cloudwatch_log_group.worker.name }
}

output "api_url" {
  description = "Base URL of the API."
  value       = module.services.api_url
}

output "alb_dns_name" {
  description = "DNS name of the load balancer (point api_domain_name at it)."
  value       = module.services.alb_dns_name
}

output "queue_url" {
  description = "URL of the build queue."
  value       = module.queue.queue_url
}

output "dlq_url" {
  description = "URL of the dead-letter queue."
  value       = module.queue.dlq_url
}

output "table_name" {
  description = "Name of the DynamoDB table."
  value       = module.data.table_name
}

output "ecr_repository_urls" {
  description = "ECR repositories to push the images to, by service."
  value       = module.services.ecr_repository_urls
}

output "cluster_name" {
  description = "Name of the ECS cluster."
  value       = module.services.cluster_name
}

output "service_names" {
  description = "Names of the ECS services, by service."
  value       = module.services.service_names
}

output "ops_policy_arn" {
  description = "IAM policy for operators running the buildq CLI (attach it to their role)."
  value       = module.services.ops_policy_arn
}

output "alarm_topic_arn" {
  description = "SNS topic every alarm notifies."
  value       = module.services.alarm_topic_arn
}

output "log_group_names" {
  description = "CloudWatch log groups, by service."
  value       = module.services.log_group_names
}

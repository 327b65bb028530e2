output "queue_name" {
  description = "Name of the build queue."
  value       = aws_sqs_queue.builds.name
}

output "queue_url" {
  description = "URL of the build queue."
  value       = aws_sqs_queue.builds.id
}

output "queue_arn" {
  description = "ARN of the build queue."
  value       = aws_sqs_queue.builds.arn
}

output "dlq_name" {
  description = "Name of the dead-letter queue."
  value       = aws_sqs_queue.dlq.name
}

output "dlq_url" {
  description = "URL of the dead-letter queue."
  value       = aws_sqs_queue.dlq.id
}

output "dlq_arn" {
  description = "ARN of the dead-letter queue."
  value       = aws_sqs_queue.dlq.arn
}

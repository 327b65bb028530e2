output "table_name" {
  description = "Name of the projects table."
  value       = aws_dynamodb_table.projects.name
}

output "table_arn" {
  description = "ARN of the projects table."
  value       = aws_dynamodb_table.projects.arn
}

output "sweep_index_arn" {
  description = "ARN of the sweeper's index."
  value       = "${aws_dynamodb_table.projects.arn}/index/sweep"
}

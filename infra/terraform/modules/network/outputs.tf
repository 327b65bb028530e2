output "vpc_id" {
  description = "The VPC."
  value       = data.aws_vpc.this.id
}

output "private_subnet_ids" {
  description = "Subnets of the tasks (checked to be in the VPC)."
  value       = [for subnet in data.aws_subnet.private : subnet.id]
}

output "public_subnet_ids" {
  description = "Subnets of the load balancer (checked to be in the VPC)."
  value       = [for subnet in data.aws_subnet.public : subnet.id]
}

output "alb_security_group_id" {
  description = "Security group of the load balancer."
  value       = aws_security_group.alb.id
}

output "api_security_group_id" {
  description = "Security group of the API tasks."
  value       = aws_security_group.api.id
}

output "worker_security_group_id" {
  description = "Security group of the worker tasks."
  value       = aws_security_group.worker.id
}

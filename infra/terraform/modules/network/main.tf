# Network inputs: an existing VPC and its subnets (checked to belong to it), and the
# security groups of the load balancer, the API tasks and the worker tasks.

data "aws_vpc" "this" {
  id = var.vpc_id
}

data "aws_subnet" "private" {
  for_each = toset(var.private_subnet_ids)
  id       = each.value

  lifecycle {
    postcondition {
      condition     = self.vpc_id == var.vpc_id
      error_message = "Every private subnet must be in vpc_id."
    }
  }
}

data "aws_subnet" "public" {
  for_each = toset(var.public_subnet_ids)
  id       = each.value

  lifecycle {
    postcondition {
      condition     = self.vpc_id == var.vpc_id
      error_message = "Every load balancer subnet must be in vpc_id."
    }
  }
}

resource "aws_security_group" "alb" {
  #checkov:skip=CKV2_AWS_5: attached to the load balancer in modules/services, through this module's outputs (checkov does not follow module outputs)
  name        = "${var.name}-alb"
  description = "${var.name} load balancer: HTTPS in, the API tasks out"
  vpc_id      = data.aws_vpc.this.id
}

resource "aws_vpc_security_group_ingress_rule" "alb_https" {
  for_each = toset(var.alb_ingress_cidrs)

  security_group_id = aws_security_group.alb.id
  description       = "HTTPS from ${each.value}"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_egress_rule" "alb_to_api" {
  security_group_id            = aws_security_group.alb.id
  description                  = "To the API tasks"
  ip_protocol                  = "tcp"
  from_port                    = var.app_port
  to_port                      = var.app_port
  referenced_security_group_id = aws_security_group.api.id
}

resource "aws_security_group" "api" {
  #checkov:skip=CKV2_AWS_5: attached to the API service in modules/services, through this module's outputs (checkov does not follow module outputs)
  name        = "${var.name}-api"
  description = "${var.name} API tasks: the load balancer in, AWS APIs out"
  vpc_id      = data.aws_vpc.this.id
}

resource "aws_vpc_security_group_ingress_rule" "api_from_alb" {
  security_group_id            = aws_security_group.api.id
  description                  = "From the load balancer"
  ip_protocol                  = "tcp"
  from_port                    = var.app_port
  to_port                      = var.app_port
  referenced_security_group_id = aws_security_group.alb.id
}

resource "aws_vpc_security_group_egress_rule" "api_https" {
  security_group_id = aws_security_group.api.id
  description       = "HTTPS to AWS APIs (DynamoDB, SQS, ECR, CloudWatch Logs) through NAT or VPC endpoints"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = "0.0.0.0/0"
}

resource "aws_security_group" "worker" {
  #checkov:skip=CKV2_AWS_5: attached to the worker service in modules/services, through this module's outputs (checkov does not follow module outputs)
  name        = "${var.name}-worker"
  description = "${var.name} worker tasks: nothing in, HTTPS out"
  vpc_id      = data.aws_vpc.this.id
}

resource "aws_vpc_security_group_egress_rule" "worker_https" {
  security_group_id = aws_security_group.worker.id
  description       = "HTTPS to AWS APIs and whatever the workflows call"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = "0.0.0.0/0"
}

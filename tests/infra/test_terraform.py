"""infra/terraform, read statically (python-hcl2): it parses, and its wiring agrees
with the code: the table and queues `buildq bootstrap` creates, the settings the
containers get, the metric the workers publish, least-privilege roles."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from buildq.items import SWEEP_INDEX, TTL_ATTRIBUTE
from buildq.resources import (
    dlq_attributes,
    queue_attributes,
    redrive_max_receive_count,
    table_definition,
)
from buildq.settings import ApiSettings, Settings, WorkerSettings
from buildq_api.routes.health import router as health_router
from buildq_worker.sweeper import backlog_emf
from tests.infra.hcl import ROOT, TERRAFORM, Module, expr, module, parse, ref, root, tf_files


def setting_names(settings: type[Settings]) -> set[str]:
    return {f"BUILDQ_{name.upper()}" for name in settings.model_fields}


def statements(document: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = document["statement"]
    return found


def actions_of(document: dict[str, Any]) -> set[str]:
    return {action for statement in statements(document) for action in statement["actions"]}


@pytest.mark.parametrize("path", tf_files(), ids=lambda path: str(path.relative_to(TERRAFORM)))
def test_every_tf_file_parses(path: Path) -> None:
    assert parse(path), f"{path} is empty"


def test_the_modules_are_there() -> None:
    names = {path.parent.name for path in tf_files() if path.parent.parent.name == "modules"}
    assert names == {"network", "data", "queue", "services"}
    for name in names:
        assert root().module(name)["source"] == f"./modules/{name}"


# -- the table -------------------------------------------------------------------


def test_the_table_matches_bootstrap_s_definition() -> None:
    table = module("data").resource("aws_dynamodb_table", "projects")
    want = table_definition("any")
    assert table["billing_mode"] == want["BillingMode"]
    keys = {key["KeyType"]: key["AttributeName"] for key in want["KeySchema"]}
    assert (table["hash_key"], table["range_key"]) == (keys["HASH"], keys["RANGE"])
    assert {(a["name"], a["type"]) for a in table["attribute"]} == {
        (a["AttributeName"], a["AttributeType"]) for a in want["AttributeDefinitions"]
    }
    [index] = table["global_secondary_index"]
    [want_index] = want["GlobalSecondaryIndexes"]
    index_keys = {key["KeyType"]: key["AttributeName"] for key in want_index["KeySchema"]}
    assert index["name"] == want_index["IndexName"] == SWEEP_INDEX
    assert (index["hash_key"], index["range_key"]) == (index_keys["HASH"], index_keys["RANGE"])
    assert index["projection_type"] == want_index["Projection"]["ProjectionType"]
    assert index["non_key_attributes"] == want_index["Projection"]["NonKeyAttributes"]
    [ttl] = table["ttl"]
    assert ttl == {"attribute_name": TTL_ATTRIBUTE, "enabled": True}
    assert table["point_in_time_recovery"] == [{"enabled": True}]
    [sse] = table["server_side_encryption"]
    assert sse["enabled"] is True
    assert ref(sse["kms_key_arn"]) == "var.kms_key_arn"
    outputs = module("data").outputs
    assert expr(outputs["sweep_index_arn"]["value"]).endswith(f"/index/{SWEEP_INDEX}")


def test_resource_names_default_to_the_settings_defaults() -> None:
    name = root().variables["name"]["default"]
    settings = Settings()
    for module_name, argument, setting in (
        ("data", "table_name", settings.table_name),
        ("queue", "queue_name", settings.queue_name),
        ("queue", "dlq_name", settings.dlq_name),
    ):
        template = root().module(module_name)[argument]
        assert template.replace("${var.name}", name) == setting, (module_name, argument)


# -- the queues ------------------------------------------------------------------


def test_queue_attributes_match_bootstrap_s() -> None:
    queue_module = module("queue")
    builds = queue_module.resource("aws_sqs_queue", "builds")
    dlq = queue_module.resource("aws_sqs_queue", "dlq")
    want = queue_attributes("arn:dlq", max_attempts=3)
    variables = root().variables
    assert ref(builds["visibility_timeout_seconds"]) == "var.visibility_timeout_seconds"
    assert (
        str(variables["queue_visibility_timeout_seconds"]["default"]) == want["VisibilityTimeout"]
    )
    assert ref(builds["message_retention_seconds"]) == "var.message_retention_seconds"
    assert ref(dlq["message_retention_seconds"]) == "var.message_retention_seconds"
    retention = str(variables["queue_message_retention_seconds"]["default"])
    assert retention == want["MessageRetentionPeriod"] == dlq_attributes()["MessageRetentionPeriod"]
    assert str(builds["receive_wait_time_seconds"]) == want["ReceiveMessageWaitTimeSeconds"]
    # Both encrypted (SSE with the stack's key).
    for queue in (builds, dlq):
        assert ref(queue["kms_master_key_id"]) == "var.kms_key_arn"
    # The root passes the same variables the defaults above belong to.
    root_queue = root().module("queue")
    assert ref(root_queue["visibility_timeout_seconds"]) == "var.queue_visibility_timeout_seconds"
    assert ref(root_queue["message_retention_seconds"]) == "var.queue_message_retention_seconds"


def test_redrive_max_receive_count_is_max_attempts_plus_two_as_in_resources_py() -> None:
    queue_module = module("queue")
    builds = queue_module.resource("aws_sqs_queue", "builds")
    policy = expr(builds["redrive_policy"])
    assert re.fullmatch(
        r"jsonencode\(\{deadLetterTargetArn = aws_sqs_queue\.dlq\.arn, "
        r"maxReceiveCount = local\.max_receive_count\}\)",
        policy,
    ), policy
    formula = re.fullmatch(
        r"var\.max_attempts \+ (\d+)", expr(queue_module.locals["max_receive_count"])
    )
    assert formula, queue_module.locals["max_receive_count"]
    plus = int(formula.group(1))
    for max_attempts in range(1, 11):
        assert max_attempts + plus == redrive_max_receive_count(max_attempts)
        redrive = json.loads(queue_attributes("arn:dlq", max_attempts)["RedrivePolicy"])
        assert redrive["maxReceiveCount"] == max_attempts + plus
    allow = expr(
        queue_module.resource("aws_sqs_queue_redrive_allow_policy", "dlq")["redrive_allow_policy"]
    )
    assert 'redrivePermission = "byQueue"' in allow
    assert "sourceQueueArns = [aws_sqs_queue.builds.arn]" in allow


def test_max_attempts_comes_from_one_variable_for_the_queue_and_the_containers() -> None:
    assert root().variables["max_attempts"]["default"] == Settings().max_attempts
    assert ref(root().module("queue")["max_attempts"]) == "var.max_attempts"
    assert ref(root().module("services")["max_attempts"]) == "var.max_attempts"
    common = module("services").locals["common_environment"]
    assert expr(common["BUILDQ_MAX_ATTEMPTS"]) == "tostring(var.max_attempts)"


# -- the containers --------------------------------------------------------------


def container_definitions(task: str) -> str:
    services = module("services")
    return expr(services.resource("aws_ecs_task_definition", task)["container_definitions"])


def test_the_worker_gets_its_settings_from_the_variables() -> None:
    services = module("services")
    worker = services.locals["worker_environment"]
    assert expr(worker["BUILDQ_MAX_WORKFLOW_WORKERS"]) == "tostring(var.max_workflow_workers)"
    assert ref(root().module("services")["max_workflow_workers"]) == "var.max_workflow_workers"
    assert worker["BUILDQ_METRICS_HOST"] == "0.0.0.0"
    assert expr(worker["BUILDQ_DRAIN_SECONDS"]) == "tostring(var.drain_seconds)"
    assert ref(root().module("services")["drain_seconds"]) == "var.drain_seconds"
    assert "merge(local.common_environment, local.worker_environment)" in (
        container_definitions("worker")
    )
    assert root().variables["max_workflow_workers"]["default"] == (
        WorkerSettings.model_fields["max_workflow_workers"].default
    )


def test_the_api_listens_on_all_interfaces_and_reads_the_cursor_secret_from_ssm() -> None:
    services = module("services")
    assert services.locals["api_environment"]["BUILDQ_API_HOST"] == "0.0.0.0"
    assert "merge(local.common_environment, local.api_environment)" in container_definitions("api")
    assert "secrets = [for key, arn in local.api_secrets" in container_definitions("api")
    assert ref(services.locals["api_secrets"]["BUILDQ_CURSOR_SECRET"]) == (
        "aws_ssm_parameter.cursor_secret.arn"
    )
    parameter = services.resource("aws_ssm_parameter", "cursor_secret")
    assert parameter["type"] == "SecureString"
    assert ref(parameter["value"]) == "var.cursor_secret"
    assert root().variables["cursor_secret"]["sensitive"] is True
    assert services.variables["cursor_secret"]["sensitive"] is True
    assert "cursor_secret" not in json.dumps(services.locals["api_environment"])


def test_every_buildq_variable_the_containers_get_is_a_setting() -> None:
    env = module("services").locals
    common = set(env["common_environment"])
    api = common | set(env["api_environment"]) | set(env["api_secrets"])
    worker = common | set(env["worker_environment"])
    assert api - setting_names(ApiSettings) == set()
    assert worker - setting_names(WorkerSettings) == set()
    assert {"BUILDQ_TABLE_NAME", "BUILDQ_QUEUE_NAME", "BUILDQ_DLQ_NAME"} <= common


def test_the_worker_stops_within_120_seconds_with_time_to_drain() -> None:
    services = module("services")
    assert services.locals["worker_stop_timeout"] == 120
    assert "stopTimeout = local.worker_stop_timeout" in container_definitions("worker")
    drain = root().variables["drain_seconds"]
    assert drain["default"] < 120
    [validation] = drain["validation"]
    limit = re.search(r"var\.drain_seconds <= (\d+)", expr(validation["condition"]))
    assert limit
    assert int(limit.group(1)) < services.locals["worker_stop_timeout"]


def test_the_worker_service_has_no_load_balancer_and_the_api_s_checks_readyz() -> None:
    services = module("services")
    assert "load_balancer" not in services.resource("aws_ecs_service", "worker")
    assert services.resource("aws_ecs_service", "api")["load_balancer"]
    [health] = services.resource("aws_lb_target_group", "api")["health_check"]
    assert health["path"] == "/readyz"
    assert {"/readyz", "/healthz"} <= {getattr(route, "path", "") for route in health_router.routes}


def test_the_cluster_has_container_insights() -> None:
    cluster = module("services").resource("aws_ecs_cluster", "this")
    assert {"name": "containerInsights", "value": "enabled"} in cluster["setting"]


# -- IAM -------------------------------------------------------------------------

CONSUMING = {
    "sqs:ReceiveMessage",
    "sqs:DeleteMessage",
    "sqs:DeleteMessageBatch",
    "sqs:ChangeMessageVisibility",
    "sqs:PurgeQueue",
}


def test_the_api_role_cannot_receive_or_delete_messages() -> None:
    api = module("services").data("aws_iam_policy_document", "api")
    actions = actions_of(api)
    assert actions & CONSUMING == set()
    assert {"sqs:SendMessage", "dynamodb:PutItem", "dynamodb:GetItem"} <= actions
    for statement in statements(api):
        sqs = [action for action in statement["actions"] if action.startswith("sqs:")]
        if not sqs:
            continue
        resources = [ref(resource) for resource in statement["resources"]]
        assert set(resources) <= {"var.queue_arn", "var.dlq_arn"}
        if "var.dlq_arn" in resources:  # the DLQ only to resolve its URL
            assert sqs == ["sqs:GetQueueUrl"]


def test_the_worker_role_covers_what_the_worker_calls() -> None:
    worker = module("services").data("aws_iam_policy_document", "worker")
    by_resource: dict[str, set[str]] = {}
    for statement in statements(worker):
        for resource in statement["resources"]:
            by_resource.setdefault(expr(resource), set()).update(statement["actions"])
    assert CONSUMING - {"sqs:PurgeQueue", "sqs:DeleteMessageBatch"} <= by_resource["var.queue_arn"]
    assert {"sqs:SendMessage", "sqs:GetQueueUrl", "sqs:GetQueueAttributes"} <= (
        by_resource["var.queue_arn"] & by_resource["var.dlq_arn"]
    )
    assert by_resource["var.sweep_index_arn"] == {"dynamodb:Query"}
    assert {"dynamodb:UpdateItem", "dynamodb:GetItem", "dynamodb:PutItem"} <= (
        by_resource["var.table_arn"]
    )
    [protection] = [
        key for key, actions in by_resource.items() if "ecs:UpdateTaskProtection" in actions
    ]
    assert protection.endswith(":task/${aws_ecs_cluster.this.name}/*")


def test_no_policy_uses_wildcard_actions_or_resources_where_aws_has_narrower() -> None:
    documents = [
        (f"{directory.name}:{name}", document)
        for directory in [TERRAFORM, *sorted((TERRAFORM / "modules").iterdir())]
        for name, document in Module(directory).datas("aws_iam_policy_document").items()
    ]
    assert len(documents) >= 6
    for name, document in documents:
        for statement in statements(document):
            sid = statement.get("sid", "?")
            if name == "terraform:kms":  # a key policy: "*" is the key itself
                if statement["actions"] == ["kms:*"]:
                    [principal] = statement["principals"]
                    assert principal["identifiers"][0].endswith(":root")
                continue
            assert not [a for a in statement["actions"] if "*" in a], (name, sid)
            if "*" in statement.get("resources", []):
                assert statement["actions"] == ["ecr:GetAuthorizationToken"], (name, sid)


# -- autoscaling and alarms ------------------------------------------------------


def test_workers_scale_on_the_backlog_metric_the_workers_publish() -> None:
    services = module("services")
    emf = backlog_emf("buildq-builds", visible=3, worker_slots=2, timestamp_ms=0)
    [directive] = emf["_aws"]["CloudWatchMetrics"]
    local = services.locals
    assert local["emf_namespace"] == directive["Namespace"]
    assert local["backlog_metric_name"] in {metric["Name"] for metric in directive["Metrics"]}
    assert [[local["backlog_dimension"]]] == directive["Dimensions"]
    assert local["backlog_metric_name"] in emf
    assert emf[local["backlog_dimension"]] == "buildq-builds"

    policy = services.resource("aws_appautoscaling_policy", "worker_backlog")
    assert policy["policy_type"] == "TargetTrackingScaling"
    [config] = policy["target_tracking_scaling_policy_configuration"]
    assert ref(config["target_value"]) == "var.worker_backlog_target"
    [metric] = config["customized_metric_specification"]
    assert ref(metric["namespace"]) == "local.emf_namespace"
    assert ref(metric["metric_name"]) == "local.backlog_metric_name"
    [dimension] = metric["dimensions"]
    assert ref(dimension["name"]) == "local.backlog_dimension"
    assert ref(dimension["value"]) == "var.queue_name"
    target = services.resource("aws_appautoscaling_target", "worker")
    assert ref(target["min_capacity"]) == "var.worker_min_count"
    assert ref(target["max_capacity"]) == "var.worker_max_count"
    assert "aws_ecs_service.worker.name" in expr(target["resource_id"])
    api = services.resource("aws_appautoscaling_policy", "api_cpu")
    [api_config] = api["target_tracking_scaling_policy_configuration"]
    [predefined] = api_config["predefined_metric_specification"]
    assert predefined["predefined_metric_type"] == "ECSServiceAverageCPUUtilization"


def test_the_alarms_watch_the_dlq_the_backlog_5xx_and_the_worker_s_lease_events() -> None:
    services = module("services")
    alarms = services.resources("aws_cloudwatch_metric_alarm")
    assert {"dlq_not_empty", "queue_backlog_age", "api_5xx_rate", "worker"} <= set(alarms)
    assert ref(alarms["dlq_not_empty"]["dimensions"]["QueueName"]) == "var.dlq_name"
    age = json.dumps(alarms["queue_backlog_age"]["metric_query"])
    assert "ApproximateAgeOfOldestMessage" in age
    assert "HTTPCode_Target_5XX_Count" in json.dumps(alarms["api_5xx_rate"]["metric_query"])
    for alarm in alarms.values():
        assert ref(alarm["alarm_actions"][0]) == "aws_sns_topic.alarms.arn"
    events = {entry["event"] for entry in services.locals["worker_log_alarms"].values()}
    assert events == {"project.lease_lost", "heartbeat.lease_failed"}
    # The worker still logs them under these names.
    worker_source = "\n".join(
        path.read_text() for path in (ROOT / "services/worker/src/buildq_worker").glob("*.py")
    )
    for event in events:
        assert f'"{event}"' in worker_source, event
    log_filter = services.resource("aws_cloudwatch_log_metric_filter", "worker")
    assert log_filter["pattern"] == '{ $.event = "${each.value.event}" }'
    assert ref(log_filter["log_group_name"]) == "aws_cloudwatch_log_group.worker.name"


# -- operators' files ------------------------------------------------------------


def test_the_tfvars_example_sets_every_required_variable_and_only_known_ones() -> None:
    example = parse(TERRAFORM / "terraform.tfvars.example")
    variables = root().variables
    assert set(example) <= set(variables)
    required = {name for name, body in variables.items() if "default" not in body}
    assert required <= set(example)


def test_the_outputs_operators_need() -> None:
    assert {"api_url", "queue_url", "dlq_url", "table_name", "ecr_repository_urls"} <= set(
        root().outputs
    )

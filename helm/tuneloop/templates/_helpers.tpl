{{/* Names and labels shared by every template. */}}

{{/* The chart name, overridable with nameOverride. */}}
{{- define "tuneloop.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The operator's resource names: "<release>-operator" unless fullnameOverride is set. */}}
{{- define "tuneloop.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels on every object, but the component. */}}
{{- define "tuneloop.baseLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "tuneloop.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tuneloop
{{- end -}}

{{/* Labels on the operator's objects. */}}
{{- define "tuneloop.labels" -}}
{{ include "tuneloop.baseLabels" . }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* Labels on what the chart creates for trainer pods (ServiceAccounts, NetworkPolicies). */}}
{{- define "tuneloop.trainerLabels" -}}
{{ include "tuneloop.baseLabels" . }}
app.kubernetes.io/component: trainer
{{- end -}}

{{/* Labels selecting the operator pod. */}}
{{- define "tuneloop.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tuneloop.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* Labels of the pod template: the selector labels plus podLabels. */}}
{{- define "tuneloop.podLabels" -}}
{{ include "tuneloop.labels" . }}
{{- with .Values.podLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* "repository:tag" or "repository@digest"; the tag defaults to the chart's appVersion. */}}
{{- define "tuneloop.imageRef" -}}
{{- $image := index . 0 -}}
{{- $appVersion := index . 1 -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository (default $appVersion $image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The operator's ServiceAccount. */}}
{{- define "tuneloop.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tuneloop.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name: name the existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The trainer pods' ServiceAccount; empty: the namespace's default. */}}
{{- define "tuneloop.trainerServiceAccountName" -}}
{{- if .Values.trainer.serviceAccount.create -}}
{{- default (printf "%s-trainer" .Release.Name | trunc 63 | trimSuffix "-") .Values.trainer.serviceAccount.name -}}
{{- else -}}
{{- .Values.trainer.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Labels of the trainer pods (set by the operator, see operator/tuneloop_operator/render.py). */}}
{{- define "tuneloop.trainerSelector" -}}
matchLabels:
  app.kubernetes.io/managed-by: tuneloop
matchExpressions:
  - key: tuneloop.dev/job
    operator: Exists
{{- end -}}

{{/* Combinations of values that cannot work: fail the render with what to change. */}}
{{- define "tuneloop.validate" -}}
{{- if and (eq .Values.rbac.scope "namespaced") (not .Values.watchNamespaces) -}}
{{- fail "rbac.scope=namespaced needs watchNamespaces: list the namespaces the operator serves (it gets a Role in each)" -}}
{{- end -}}
{{- if and .Values.trainer.serviceAccount.create (not .Values.watchNamespaces) -}}
{{- fail "trainer.serviceAccount.create needs watchNamespaces: the trainer ServiceAccount is created in each listed namespace (cluster-wide, create it yourself in every namespace that runs jobs and set trainer.serviceAccount.name)" -}}
{{- end -}}
{{- if and .Values.trainer.serviceAccount.annotations (not .Values.trainer.serviceAccount.create) -}}
{{- fail "trainer.serviceAccount.annotations are set but trainer.serviceAccount.create is false: the chart only annotates a ServiceAccount it creates" -}}
{{- end -}}
{{- if lt (float64 .Values.config.backoffMaxSeconds) (float64 .Values.config.backoffBaseSeconds) -}}
{{- fail "config.backoffMaxSeconds must be at least config.backoffBaseSeconds" -}}
{{- end -}}
{{- if eq (int .Values.config.metricsPort) (int .Values.config.healthPort) -}}
{{- fail "config.metricsPort and config.healthPort must differ" -}}
{{- end -}}
{{- end -}}

{{/* A NetworkPolicyPeer list for a destination: an ipBlock per CIDR, and namespace/pod labels. */}}
{{- define "tuneloop.peers" -}}
{{- range .cidrs }}
- ipBlock:
    cidr: {{ . | quote }}
{{- end }}
{{- if or .namespaceLabels .podLabels }}
- namespaceSelector:
    {{- if .namespaceLabels }}
    matchLabels:
      {{- toYaml .namespaceLabels | nindent 6 }}
    {{- else }} {}
    {{- end }}
  podSelector:
    {{- if .podLabels }}
    matchLabels:
      {{- toYaml .podLabels | nindent 6 }}
    {{- else }} {}
    {{- end }}
{{- end }}
{{- end -}}

{{/* NetworkPolicyPorts: each port, TCP. */}}
{{- define "tuneloop.ports" -}}
{{- range . }}
- port: {{ . }}
  protocol: TCP
{{- end }}
{{- end -}}

{{/* The operator's rules on namespaced resources (permissions.NAMESPACED_RULES), in order. */}}
{{- define "tuneloop.namespacedRules" -}}
# FineTuneJobs, watched; patched for Kopf's finalizer and progress annotations.
- apiGroups: ["tuneloop.dev"]
  resources: ["finetunejobs"]
  verbs: ["get", "list", "watch", "patch"]
# Status (conditions, progress, attempts), through the status subresource.
- apiGroups: ["tuneloop.dev"]
  resources: ["finetunejobs/status"]
  verbs: ["patch"]
# Trainer pods: created per attempt, watched for exit codes, deleted on retry or cancel.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch", "create", "delete"]
# A run's ConfigMap (job.json) and headless Service (pod 0 of a multi-node run).
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["list", "create", "delete"]
# The Secret a job names in spec.storage.secretRef (or the platform's default), read by name
# for the S3 heartbeat. Never list or watch: the operator sees no Secret it was not pointed at.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
# Events on FineTuneJobs, the operator's and Kopf's: each a new core v1 Event.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}

{{/* The egress rule to DNS (port 53, UDP and TCP). */}}
{{- define "tuneloop.dnsEgress" -}}
- to:
    {{- include "tuneloop.peers" .dns | trim | nindent 4 }}
  ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
{{- end -}}

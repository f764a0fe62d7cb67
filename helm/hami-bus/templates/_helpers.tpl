{{/* Chart name. */}}
{{- define "hami-bus.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, or the release name when it already holds the chart name. */}}
{{- define "hami-bus.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Name of one component's objects: (dict "ctx" $ "component" "binder"). */}}
{{- define "hami-bus.componentName" -}}
{{- printf "%s-%s" (include "hami-bus.fullname" .ctx | trunc 50 | trimSuffix "-") .component }}
{{- end }}

{{- define "hami-bus.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "hami-bus.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component: (dict "ctx" $ "component" "binder"). */}}
{{- define "hami-bus.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hami-bus.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* All labels of one component's objects. */}}
{{- define "hami-bus.componentLabels" -}}
{{ include "hami-bus.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "hami-bus.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/*
The NATS URL: natsUrl when given, else the Service of the NATS subchart (named as the
official chart names it: its fullname, port 4222).
*/}}
{{- define "hami-bus.natsUrl" -}}
{{- if .Values.natsUrl }}
{{- .Values.natsUrl }}
{{- else if .Values.nats.enabled }}
{{- $name := default "nats" .Values.nats.nameOverride }}
{{- $svc := "" }}
{{- if .Values.nats.fullnameOverride }}
{{- $svc = .Values.nats.fullnameOverride }}
{{- else if contains $name .Release.Name }}
{{- $svc = .Release.Name }}
{{- else }}
{{- $svc = printf "%s-%s" .Release.Name $name }}
{{- end }}
{{- printf "nats://%s.%s.svc:4222" ($svc | trunc 63 | trimSuffix "-") .Release.Namespace }}
{{- else }}
{{- fail "nats.enabled is false: set natsUrl to the NATS server the services should use" }}
{{- end }}
{{- end }}

{{/* The services' configuration file (shared/config.py's YAML, camelCase keys). */}}
{{- define "hami-bus.config" -}}
{{- $cfg := deepCopy .Values.config }}
{{- $scheduler := merge (dict "schedulerName" .Values.schedulerName) ($cfg.scheduler | default dict) }}
{{- $_ := set $cfg "scheduler" $scheduler }}
{{- toYaml $cfg }}
{{- end }}

{{/*
Pod template metadata shared by every component: (dict "ctx" $ "component" "binder").
The checksum rolls the pods when the configuration changes. hami.io/webhook=ignore keeps
our own pods away from our webhook (no chicken-and-egg when the binder restarts).
*/}}
{{- define "hami-bus.podMetadata" -}}
labels:
  {{- include "hami-bus.selectorLabels" . | nindent 2 }}
  hami.io/webhook: ignore
  {{- with .ctx.Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
annotations:
  checksum/config: {{ include "hami-bus.config" .ctx | sha256sum }}
  {{- with .ctx.Values.podAnnotations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{/* Environment shared by every component. */}}
{{- define "hami-bus.env" -}}
- name: HAMI_CONFIG
  value: /etc/hami/config.yaml
- name: HAMI_NATS_URL
  value: {{ include "hami-bus.natsUrl" . | quote }}
- name: HAMI_NATS_REPLICAS
  value: {{ if and .Values.nats.enabled .Values.nats.config.cluster.enabled }}{{ .Values.nats.config.cluster.replicas | quote }}{{ else }}"1"{{ end }}
{{- end }}

{{- define "hami-bus.configVolume" -}}
- name: config
  configMap:
    name: {{ include "hami-bus.fullname" . }}-config
{{- end }}

{{- define "hami-bus.configMount" -}}
- name: config
  mountPath: /etc/hami
  readOnly: true
{{- end }}

{{/* Scheduling fields of one component's pod: the component's values. */}}
{{- define "hami-bus.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The webhook's TLS Secret name. */}}
{{- define "hami-bus.webhookSecret" -}}
{{- .Values.binder.webhook.tls.existingSecret | default (printf "%s-webhook-tls" (include "hami-bus.fullname" .)) }}
{{- end }}

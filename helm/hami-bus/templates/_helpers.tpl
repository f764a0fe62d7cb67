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

{{/* The NATS URL: natsUrl when given, else the client Service of templates/nats.yaml. */}}
{{- define "hami-bus.natsUrl" -}}
{{- if .Values.natsUrl }}
{{- .Values.natsUrl }}
{{- else if .Values.nats.enabled }}
{{- printf "nats://%s.%s.svc:4222" (include "hami-bus.componentName" (dict "ctx" . "component" "nats")) .Release.Namespace }}
{{- else }}
{{- fail "nats.enabled is false: set natsUrl to the NATS server the services should use" }}
{{- end }}
{{- end }}

{{/* Copies each stream and bucket keeps: natsStreamReplicas, else the NATS cluster size. */}}
{{- define "hami-bus.natsReplicas" -}}
{{- if .Values.natsStreamReplicas }}
{{- .Values.natsStreamReplicas }}
{{- else if .Values.nats.enabled }}
{{- .Values.nats.replicas }}
{{- else }}
{{- 1 }}
{{- end }}
{{- end }}

{{/* The services' configuration file (shared/config.py's YAML, camelCase keys). */}}
{{- define "hami-bus.config" -}}
{{- $cfg := deepCopy .Values.config }}
{{- $s := .Values.scheduler }}
{{- $top := dict "schedulerName" .Values.schedulerName "mode" $s.mode "extenderPort" $s.extenderPort "extenderReservationTimeout" $s.extenderReservationTimeout }}
{{- $scheduler := merge $top ($cfg.scheduler | default dict) }}
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
  {{- if and (eq .component "binder") (eq .ctx.Values.scheduler.mode "extender") }}
  checksum/kube-scheduler: {{ include "hami-bus.kubeSchedulerConfig" .ctx | sha256sum }}
  {{- end }}
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
  value: {{ include "hami-bus.natsReplicas" . | quote }}
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

{{/*
Scheduling fields of one component's pod: (dict "ctx" $ "component" "binder" "values"
.Values.binder). Replicated components spread over nodes unless given their own affinity.
*/}}
{{- define "hami-bus.scheduling" -}}
{{- $v := .values }}
{{- with $v.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if $v.affinity }}
affinity:
  {{- toYaml $v.affinity | nindent 2 }}
{{- else if and (gt (int ($v.replicas | default 1)) 1) (ne .ctx.Values.podAntiAffinity "none") }}
{{- $term := dict "topologyKey" "kubernetes.io/hostname" "labelSelector" (dict "matchLabels" (include "hami-bus.selectorLabels" . | fromYaml)) }}
affinity:
  podAntiAffinity:
    {{- if eq .ctx.Values.podAntiAffinity "hard" }}
    requiredDuringSchedulingIgnoredDuringExecution:
      - {{- toYaml $term | nindent 8 }}
    {{- else }}
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          {{- toYaml $term | nindent 10 }}
    {{- end }}
{{- end }}
{{- end }}

{{/*
A PodDisruptionBudget for a component with more than one replica, so a node drain never
takes all of them at once: (dict "ctx" $ "component" "binder" "values" .Values.binder).
*/}}
{{- define "hami-bus.pdb" -}}
{{- if gt (int (.values.replicas | default 1)) 1 }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "hami-bus.componentName" . }}
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "hami-bus.componentLabels" . | nindent 4 }}
spec:
  maxUnavailable: 1
  selector:
    matchLabels:
      {{- include "hami-bus.selectorLabels" . | nindent 6 }}
{{- end }}
{{- end }}

{{/* The health port and probes of a container running one of our services. */}}
{{- define "hami-bus.healthArgs" -}}
- --health-port={{ .Values.health.port }}
{{- end }}

{{- define "hami-bus.healthPort" -}}
- name: health
  containerPort: {{ .Values.health.port }}
{{- end }}

{{- define "hami-bus.probes" -}}
livenessProbe:
  httpGet: {path: /healthz, port: health}
  {{- toYaml .Values.health.livenessProbe | nindent 2 }}
readinessProbe:
  httpGet: {path: /readyz, port: health}
  {{- toYaml .Values.health.readinessProbe | nindent 2 }}
{{- end }}

{{/* The webhook's TLS Secret name. */}}
{{- define "hami-bus.webhookSecret" -}}
{{- $certs := .Values.binder.webhook.certs }}
{{- if and (eq $certs.mode "provided") $certs.existingSecret }}
{{- $certs.existingSecret }}
{{- else }}
{{- $certs.secretName | default (printf "%s-webhook-tls" (include "hami-bus.fullname" .)) }}
{{- end }}
{{- end }}

{{/* The MutatingWebhookConfiguration's name (cluster-scoped, so it carries the release). */}}
{{- define "hami-bus.webhookConfig" -}}
{{- include "hami-bus.componentName" (dict "ctx" . "component" "webhook") }}
{{- end }}

{{/* The binder's leader election Lease. */}}
{{- define "hami-bus.binderLease" -}}
{{- include "hami-bus.componentName" (dict "ctx" . "component" "binder") }}
{{- end }}

{{/*
NATS authentication (auth.enabled): the Secret `python -m hami.creds secret` printed, one
key per file init wrote (docs/security.md). Each pod mounts only the keys it needs,
through Secret items, so a service never sees another role's seed.
*/}}
{{- define "hami-bus.authSecret" -}}
{{- required "auth.enabled: set auth.secretName to the Secret made by 'python -m hami.creds secret'" .Values.auth.secretName }}
{{- end }}

{{/* Where a service's pod sees its seed and the CA (the NATS pod: hami-bus.natsAuthDir). */}}
{{- define "hami-bus.authDir" -}}
/var/run/secrets/hami.io/nats
{{- end }}

{{/* Where the NATS pod sees the Secret: init's --mount, named in its nats-server.conf. */}}
{{- define "hami-bus.natsAuthDir" -}}
/etc/hami/auth
{{- end }}

{{/* A role's seed as a Secret key (hami.creds.secret_key): nodeagent:n1 -> nodeagent.n1.nk. */}}
{{- define "hami-bus.seedKey" -}}
{{- printf "%s.nk" (replace ":" "." .) }}
{{- end }}

{{/* The environment of one service's identity: (dict "ctx" $ "seed" "placement.nk"). */}}
{{- define "hami-bus.authEnv" -}}
{{- if .ctx.Values.auth.enabled }}
- name: HAMI_NATS_SEED
  value: {{ printf "%s/%s" (include "hami-bus.authDir" .ctx) .seed | quote }}
- name: HAMI_NATS_CA
  value: {{ printf "%s/ca.crt" (include "hami-bus.authDir" .ctx) | quote }}
{{- end }}
{{- end }}

{{- define "hami-bus.authMount" -}}
{{- if .Values.auth.enabled }}
- name: nats-auth
  mountPath: {{ include "hami-bus.authDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/* The Secret volume of the seeds in .seeds (Secret keys) and the CA: (dict "ctx" $ "seeds" (list "placement.nk")). */}}
{{- define "hami-bus.authVolume" -}}
{{- if .ctx.Values.auth.enabled }}
- name: nats-auth
  secret:
    secretName: {{ include "hami-bus.authSecret" .ctx }}
    items:
      - {key: ca.crt, path: ca.crt}
      {{- range .seeds }}
      - {key: {{ . }}, path: {{ . }}}
      {{- end }}
{{- end }}
{{- end }}

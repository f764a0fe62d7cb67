{{/*
A Deployment of a service that talks to NATS (inventory, placement, metrics): non-root,
read-only root filesystem, and no API-server token unless "kube" is true (the inventory,
which lists Nodes; its grants are in rbac.yaml).
Input: (dict "ctx" $ "component" "placement" "values" .Values.placement "port" 0
             "args" (list ...) "kube" false)
With more than one replica it comes with a PodDisruptionBudget.
*/}}
{{- define "hami-bus.busDeployment" -}}
{{- $ctx := .ctx }}
{{- $v := .values }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "hami-bus.componentName" . }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "hami-bus.componentLabels" . | nindent 4 }}
spec:
  replicas: {{ $v.replicas }}
  selector:
    matchLabels:
      {{- include "hami-bus.selectorLabels" . | nindent 6 }}
  template:
    metadata:
      {{- include "hami-bus.podMetadata" . | nindent 6 }}
    spec:
      serviceAccountName: {{ include "hami-bus.componentName" . }}
      {{- if .kube }}
      automountServiceAccountToken: true    # reads the Kubernetes API (rbac.yaml)
      {{- else }}
      automountServiceAccountToken: false   # NATS only; no Kubernetes API access
      {{- end }}
      {{- with $ctx.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $ctx.Values.podSecurityContext | nindent 8 }}
      containers:
        - name: {{ .component }}
          image: {{ include "hami-bus.image" $ctx }}
          imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
          command: ["python", "-m", "services.{{ .component }}"]
          args:
            {{- include "hami-bus.healthArgs" $ctx | nindent 12 }}
            {{- with (concat (.args | default list) ($v.extraArgs | default list)) }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          env:
            {{- include "hami-bus.env" $ctx | nindent 12 }}
            {{- include "hami-bus.authEnv" (dict "ctx" $ctx "seed" (printf "%s.nk" .component)) | nindent 12 }}
          ports:
            {{- include "hami-bus.healthPort" $ctx | nindent 12 }}
            {{- if .port }}
            - name: http
              containerPort: {{ .port }}
            {{- end }}
          {{- include "hami-bus.probes" $ctx | nindent 10 }}
          resources:
            {{- toYaml $v.resources | nindent 12 }}
          securityContext:
            {{- toYaml $ctx.Values.securityContext | nindent 12 }}
          volumeMounts:
            {{- include "hami-bus.configMount" $ctx | nindent 12 }}
            - name: tmp
              mountPath: /tmp
            {{- include "hami-bus.authMount" $ctx | nindent 12 }}
      volumes:
        {{- include "hami-bus.configVolume" $ctx | nindent 8 }}
        - name: tmp
          emptyDir: {}
        {{- include "hami-bus.authVolume" (dict "ctx" $ctx "seeds" (list (printf "%s.nk" .component))) | nindent 8 }}
      {{- include "hami-bus.scheduling" . | nindent 6 }}
{{ include "hami-bus.pdb" . }}
{{- end }}

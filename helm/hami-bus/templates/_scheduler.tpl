{{/*
Extender mode (scheduler.mode=extender): the upstream kube-scheduler runs as a sidecar of
the binder, with one profile named .Values.schedulerName, and calls the binder's
extender over the pod's loopback to filter nodes by GPU and to bind. The configuration
follows the Kubernetes docs pages "kube-scheduler Configuration (v1)"
(https://kubernetes.io/docs/reference/config-api/kube-scheduler-config.v1/, the
Extender and LeaderElectionConfiguration types) and "Configure Multiple Schedulers"
(https://kubernetes.io/docs/tasks/extend-kubernetes/configure-multiple-schedulers/, the
RBAC in rbac.yaml).
*/}}

{{- define "hami-bus.extenderMode" -}}
{{- if and .Values.binder.enabled (eq .Values.scheduler.mode "extender") }}true{{ end }}
{{- end }}

{{/* The kube-scheduler's leader election Lease: one per scheduler name, as upstream names its own after itself. */}}
{{- define "hami-bus.kubeSchedulerLease" -}}
{{- .Values.schedulerName }}
{{- end }}

{{/*
An image tag from a Kubernetes version string: v1.33.0 stays, and a distribution's
suffix (v1.30.4-eks-a737599, v1.29.6+k3s1, v1.31.2-gke.1200) is dropped, since
registry.k8s.io publishes only the plain release tags. Input: the version string.
*/}}
{{- define "hami-bus.kubeVersionTag" -}}
{{- $tag := regexFind "^v?[0-9]+\\.[0-9]+\\.[0-9]+" . }}
{{- if not $tag }}
{{- fail (printf "cannot derive a kube-scheduler tag from Kubernetes version %q: set scheduler.kubeScheduler.image.tag" .) }}
{{- end }}
{{- printf "v%s" (trimPrefix "v" $tag) }}
{{- end }}

{{- define "hami-bus.kubeSchedulerImage" -}}
{{- $img := .Values.scheduler.kubeScheduler.image }}
{{- $tag := $img.tag | default (include "hami-bus.kubeVersionTag" .Capabilities.KubeVersion.Version) }}
{{- printf "%s:%s" $img.repository $tag }}
{{- end }}

{{/* The KubeSchedulerConfiguration (kubescheduler.config.k8s.io/v1) of the sidecar. */}}
{{- define "hami-bus.kubeSchedulerConfig" -}}
{{- $names := list }}
{{- range $key := list "count" "memory" "memoryPercentage" "cores" "priority" }}
{{- with index $.Values.config.resources $key }}
{{- $names = append $names . }}
{{- end }}
{{- end -}}
apiVersion: kubescheduler.config.k8s.io/v1
kind: KubeSchedulerConfiguration
# Its own Lease, next to the binder's, in the release namespace: with binder.replicas > 1
# one sidecar schedules while the others stand by.
leaderElection:
  leaderElect: true
  resourceLock: leases
  resourceName: {{ include "hami-bus.kubeSchedulerLease" . }}
  resourceNamespace: {{ .Release.Namespace }}
profiles:
  - schedulerName: {{ .Values.schedulerName }}
extenders:
  - urlPrefix: "http://127.0.0.1:{{ .Values.scheduler.extenderPort }}"
    filterVerb: filter
    bindVerb: bind              # the binder writes HAMi's annotations in the Binding itself
    preemptVerb: preempt        # kube-scheduler's preemption, with victims that free the slice
    enableHTTPS: false          # loopback inside the pod
    nodeCacheCapable: true      # the binder knows the nodes from the bus: names only
    weight: 1
    httpTimeout: 30s
    ignorable: false            # a pod asking for GPUs is never placed without the extender
    # Only pods asking for one of these reach the extender, and the scheduler leaves their
    # accounting to it (HAMi's resources are shares of a card, not countable devices).
    managedResources:
      {{- range uniq $names }}
      - name: {{ . | quote }}
        ignoredByScheduler: true
      {{- end }}
{{- end }}

{{/* The kube-scheduler sidecar container of the binder pod. */}}
{{- define "hami-bus.kubeSchedulerContainer" -}}
{{- $ks := .Values.scheduler.kubeScheduler -}}
- name: kube-scheduler
  image: {{ include "hami-bus.kubeSchedulerImage" . }}
  imagePullPolicy: {{ $ks.image.pullPolicy }}
  command: ["/usr/local/bin/kube-scheduler"]
  args:
    - --config=/etc/kube-scheduler/config.yaml
    - --v={{ $ks.verbosity }}
    {{- with $ks.extraArgs }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: sched-https
      containerPort: 10259      # kube-scheduler's secure port (self-signed, in memory)
  # /healthz is served to anonymous callers (--authorization-always-allow-paths default).
  livenessProbe:
    httpGet: {path: /healthz, port: sched-https, scheme: HTTPS}
    initialDelaySeconds: 15
    periodSeconds: 10
    timeoutSeconds: 5
    failureThreshold: 3
  readinessProbe:
    httpGet: {path: /healthz, port: sched-https, scheme: HTTPS}
    periodSeconds: 10
    timeoutSeconds: 5
    failureThreshold: 3
  resources:
    {{- toYaml $ks.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: kube-scheduler-config
      mountPath: /etc/kube-scheduler
      readOnly: true
    - name: tmp
      mountPath: /tmp
{{- end }}

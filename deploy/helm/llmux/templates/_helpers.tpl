{{- define "llmux.name" -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "llmux.labels" -}}
app.kubernetes.io/name: llmux
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: {{ .Values.mode }}
{{- end -}}

{{- define "llmux.selector" -}}
app.kubernetes.io/name: llmux
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "llmux.image" -}}
{{- $image := ternary .Values.extprocImage .Values.image (eq .Values.mode "mesh") -}}
{{ $image.repository }}:{{ $image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "llmux.configMapName" -}}
{{- .Values.existingConfigMap | default (printf "%s-config" (include "llmux.name" .)) -}}
{{- end -}}

{{/* What the chart decides in llmux's own section; everything else is the user's. */}}
{{- define "llmux.config" -}}
{{- $config := deepCopy .Values.config -}}
{{- $llmux := get $config "llmux" | default dict -}}
{{- $listen := ternary .Values.sidecar.listen (printf "0.0.0.0:%v" .Values.service.port) (eq .Values.mode "sidecar") -}}
{{- $_ := set $llmux "listen" $listen -}}
{{- $_ := set $llmux "metrics" (printf "0.0.0.0:%v" .Values.metrics.port) -}}
{{- $_ := set $llmux "runtime_dir" "/run/llmux" -}}
{{- $_ := set $llmux "workers" .Values.workers -}}
{{- $_ := set $llmux "drain_timeout" .Values.drainTimeout -}}
{{- $_ := set $config "llmux" $llmux -}}
{{- toYaml $config -}}
{{- end -}}

{{/* preStop, then the drain, then 10 s for Envoy and the workers to stop: SIGKILL must
     never cut a drain that is still within its timeout. */}}
{{- define "llmux.gracePeriod" -}}
{{- add .Values.preStopSeconds .Values.drainTimeout 10 -}}
{{- end -}}

{{- define "llmux.container" -}}
- name: llmux
  image: {{ include "llmux.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- if eq .Values.mode "mesh" }}
  args: ["extproc", "--config", "/etc/llmux/config.yaml", "--listen", "0.0.0.0:{{ .Values.mesh.grpcPort }}", "--watch"]
  ports:
    - {name: grpc, containerPort: {{ .Values.mesh.grpcPort }}}
  # grpc.health.v1 with the empty service name: what Envoy's own health checks ask.
  readinessProbe:
    grpc: {port: {{ .Values.mesh.grpcPort }}}
    periodSeconds: 2
    failureThreshold: 2
  livenessProbe:
    grpc: {port: {{ .Values.mesh.grpcPort }}}
    periodSeconds: 10
    failureThreshold: 3
  {{- else }}
  args: ["run", "--config", "/etc/llmux/config.yaml"]
  ports:
    {{- if ne .Values.mode "sidecar" }}
    - {name: http, containerPort: {{ .Values.service.port }}}
    {{- end }}
    - {name: metrics, containerPort: {{ .Values.metrics.port }}}
  {{- if eq .Values.mode "sidecar" }}
  # The kubelet cannot reach a Unix-socket (or loopback) listener, so in the sidecar the
  # probes ask whether the supervisor is up (its metrics port); the pod's readiness for
  # traffic is the application's.
  readinessProbe:
    tcpSocket: {port: metrics}
    periodSeconds: 5
  livenessProbe:
    tcpSocket: {port: metrics}
    periodSeconds: 10
    failureThreshold: 3
  {{- else }}
  # Ready: Envoy up, at least one ext_proc worker healthy, not draining. Live: Envoy
  # serving (stays 200 while draining, so a drain is never taken for a hang).
  readinessProbe:
    httpGet: {path: /health/ready, port: http}
    periodSeconds: 2
    failureThreshold: 2
  livenessProbe:
    httpGet: {path: /health/live, port: http}
    periodSeconds: 10
    failureThreshold: 3
  {{- end }}
  lifecycle:
    # The pod leaves the Service endpoints while this runs; only then does SIGTERM start
    # the drain, so new requests stop arriving before they would get a 503.
    preStop:
      sleep: {seconds: {{ .Values.preStopSeconds }}}
  {{- end }}
  {{- with .Values.envFromSecret }}
  envFrom:
    - secretRef: {name: {{ . }}}
  {{- end }}
  resources:
    {{- toYaml .Values.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - {name: config, mountPath: /etc/llmux, readOnly: true}
    - {name: run, mountPath: /run/llmux}
    - {name: tmp, mountPath: /tmp}
    {{- if eq .Values.mode "sidecar" }}
    - {name: shared, mountPath: {{ .Values.sidecar.sharedDir }}}
    {{- end }}
{{- end -}}

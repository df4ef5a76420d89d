{{/*
Chart name, shortened to 45 characters: Knative names a revision `<isvc>-predictor-00001`, which
must stay within 63.
*/}}
{{- define "cifar10.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 45 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: the InferenceService's name. The predictor's Service is `<fullname>-predictor`.
A release name that already contains the chart name is used as it is.
*/}}
{{- define "cifar10.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 45 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "cifar10.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every resource.
*/}}
{{- define "cifar10.labels" -}}
helm.sh/chart: {{ include "cifar10.chart" . }}
{{ include "cifar10.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: predictor
app.kubernetes.io/part-of: cifar10-classifier
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels.
*/}}
{{- define "cifar10.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cifar10.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The ServiceAccount's name.
*/}}
{{- define "cifar10.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "cifar10.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The predictor image: [registry/]repository[:tag][@digest].
*/}}
{{- define "cifar10.image" -}}
{{- $ref := .Values.image.repository }}
{{- with .Values.image.registry }}{{ $ref = printf "%s/%s" . $ref }}{{ end }}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if $tag }}{{ $ref = printf "%s:%s" $ref $tag }}{{ end }}
{{- with .Values.image.digest }}{{ $ref = printf "%s@%s" $ref . }}{{ end }}
{{- $ref }}
{{- end }}

{{/*
In-cluster host of the predictor. Knative mode: the cluster-local host of the Knative route
(served by knative-local-gateway, which applies the revision split). Standard mode: KServe's
`<name>-predictor` Service.
*/}}
{{- define "cifar10.predictorHost" -}}
{{- printf "%s-predictor.%s.svc.%s" (include "cifar10.fullname" .) .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{/*
PromQL label matcher selecting this InferenceService's pods, as the PodMonitor labels them.
*/}}
{{- define "cifar10.promSelector" -}}
{{- printf "namespace=\"%s\", job=\"%s\"" .Release.Namespace (include "cifar10.fullname" .) }}
{{- end }}

{{/*
Istio Gateways of the VirtualService: the configured ones plus the created one.
*/}}
{{- define "cifar10.gateways" -}}
{{- $gateways := list }}
{{- range .Values.istio.virtualService.gateways }}{{ $gateways = append $gateways . }}{{ end }}
{{- if .Values.istio.gateway.create }}
{{- $gateways = append $gateways (printf "%s/%s-gateway" .Release.Namespace (include "cifar10.fullname" .)) }}
{{- end }}
{{- toYaml $gateways }}
{{- end }}

{{/*
Seconds Knative's queue-proxy spends draining (its preStop /wait-for-drain) before the predictor
gets SIGTERM; in Knative mode the pod's grace period is the revision timeout and must cover both.
*/}}
{{- define "cifar10.knativeDrainSeconds" -}}30{{- end }}

{{/*
terminationGracePeriodSeconds of a Standard-mode pod, derived so it always covers the preStop
sleep, the predictor's drain (DRAIN_TIMEOUT_S) and a margin for the exit.
*/}}
{{- define "cifar10.terminationGracePeriodSeconds" -}}
{{- $s := .Values.shutdown }}
{{- add (int $s.preStopSleepSeconds) (int $s.drainTimeoutSeconds) (int $s.marginSeconds) }}
{{- end }}

{{/*
The predictor's DEVICE: with gpu.enabled, `auto` becomes `cuda`, so a pod that holds a GPU but cannot
use it stops with a clear error instead of quietly serving on the CPU.
*/}}
{{- define "cifar10.device" -}}
{{- if and .Values.gpu.enabled (eq .Values.model.device "auto") -}}cuda{{- else -}}{{ .Values.model.device }}{{- end -}}
{{- end }}

{{/*
TRUSTED_PROXY_HOPS: how many proxies in front of the predictor append to X-Forwarded-For (the rate
limit counts the address the outermost of them saw). With `auto`: 0 without the chart's Istio route
(the peer address counts, the header is ignored); behind it, Standard mode 1 (the ingress gateway)
and Knative mode 4 (ingress gateway, knative-local-gateway, activator, queue-proxy). helm/README.md,
"Rate limiting", has the reasoning.
*/}}
{{- define "cifar10.trustedProxyHops" -}}
{{- $v := .Values.rateLimit.trustedProxyHops }}
{{- if ne (toString $v) "auto" }}{{ int $v }}
{{- else if not (or .Values.istio.virtualService.enabled .Values.istio.gateway.create) }}0
{{- else if eq .Values.deploymentMode "Knative" }}4
{{- else }}1
{{- end }}
{{- end }}

{{/*
Path of the API keys file inside the container (env API_KEYS_FILE), when a Secret is configured.
*/}}
{{- define "cifar10.apiKeysFile" -}}
{{- with .Values.auth.apiKeys.existingSecret }}
{{- printf "%s/%s" (trimSuffix "/" $.Values.auth.apiKeys.mountPath) $.Values.auth.apiKeys.secretKey }}
{{- end }}
{{- end }}

{{/*
Labels KServe puts on the predictor pods (both modes), for the PodDisruptionBudget, the
NetworkPolicy and the Istio policies.
*/}}
{{- define "cifar10.podSelectorLabels" -}}
serving.kserve.io/inferenceservice: {{ include "cifar10.fullname" . }}
component: predictor
{{- end }}

{{/*
Checks that a JSON schema cannot express.
*/}}
{{- define "cifar10.validate" -}}
{{- if gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas) }}
{{- fail (printf "autoscaling.minReplicas (%d) must not exceed autoscaling.maxReplicas (%d)" (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- end }}
{{- if and .Values.istio.virtualService.enabled (not (include "cifar10.gateways" . | fromYamlArray)) }}
{{- fail "istio.virtualService needs a gateway: set istio.virtualService.gateways or istio.gateway.create" }}
{{- end }}
{{- if and (eq .Values.deploymentMode "Knative") (gt (int .Values.autoscaling.knative.containerConcurrency) 0) (gt (int .Values.autoscaling.knative.target) (int .Values.autoscaling.knative.containerConcurrency)) (eq .Values.autoscaling.knative.metric "concurrency") }}
{{- fail "autoscaling.knative.target must not exceed autoscaling.knative.containerConcurrency" }}
{{- end }}
{{- $drain := int .Values.shutdown.drainTimeoutSeconds }}
{{- $margin := int .Values.shutdown.marginSeconds }}
{{- if and (eq .Values.deploymentMode "Knative") (lt (int .Values.timeout) (add (include "cifar10.knativeDrainSeconds" . | int) $drain $margin | int)) }}
{{- fail (printf "timeout (%d s) is the pods' termination grace period in Knative mode: it must cover the queue-proxy drain (%s s) + shutdown.drainTimeoutSeconds (%d s) + shutdown.marginSeconds (%d s)" (int .Values.timeout) (include "cifar10.knativeDrainSeconds" .) $drain $margin) }}
{{- end }}
{{- if and .Values.auth.apiKeys.existingSecret (has .Values.auth.apiKeys.mountPath (list "/tmp" "/app" "/")) }}
{{- fail "auth.apiKeys.mountPath must be a folder of its own" }}
{{- end }}
{{- end }}

{{/* Names and labels. */}}
{{- define "imageragturbo.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "imageragturbo.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "imageragturbo.selectorLabels" -}}
app.kubernetes.io/name: {{ include "imageragturbo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "imageragturbo.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "imageragturbo.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: inference-server
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "imageragturbo.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "imageragturbo.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The claim holding the rendered model repository. */}}
{{- define "imageragturbo.modelsClaim" -}}
{{- default (printf "%s-models" (include "imageragturbo.fullname" .)) .Values.modelRepository.volume.existingClaim -}}
{{- end -}}

{{/* Startup budget: the sized minimum (values.yaml, startupSizing) and the probe's budget. */}}
{{- define "imageragturbo.startupMinimumSeconds" -}}
{{- $s := .Values.startupSizing -}}
{{- $sum := add $s.modelLoadSeconds $s.tensorrtBuildSeconds $s.indexLoadSeconds -}}
{{- div (mul $sum (add 100 $s.marginPercent)) 100 -}}
{{- end -}}

{{- define "imageragturbo.startupBudgetSeconds" -}}
{{- mul .Values.probes.startup.failureThreshold .Values.probes.startup.periodSeconds -}}
{{- end -}}

{{/* The sync init container's command for one URL into one folder. */}}
{{- define "imageragturbo.syncCommand" -}}
{{- $url := index . 0 -}}
{{- $dest := index . 1 -}}
{{- if hasPrefix "s3://" $url -}}
["aws", "s3", "sync", "--only-show-errors", "--delete", {{ $url | quote }}, {{ $dest | quote }}]
{{- else if hasPrefix "gs://" $url -}}
["gcloud", "storage", "rsync", "--recursive", "--delete-unmatched-destination-objects", {{ $url | quote }}, {{ $dest | quote }}]
{{- else -}}
{{- fail (printf "sync: unsupported URL %q (s3:// or gs://; or give sync.command)" $url) -}}
{{- end -}}
{{- end -}}

{{- define "imageragturbo.syncImage" -}}
{{- if .Values.sync.image -}}
{{- .Values.sync.image -}}
{{- else if hasPrefix "s3://" .Values.sync.url -}}
{{- .Values.sync.images.s3 -}}
{{- else if hasPrefix "gs://" .Values.sync.url -}}
{{- .Values.sync.images.gs -}}
{{- else -}}
{{- fail (printf "sync: no image for URL %q; set sync.image" .Values.sync.url) -}}
{{- end -}}
{{- end -}}

{{/*
The prometheus-adapter rule behind the HPA's metric: per pod, the time requests spent queued
for the heaviest composing models over the time they spent computing there (both Triton
counters in microseconds, as rates). clamp_min keeps an idle pod at 0 rather than NaN.
*/}}
{{- define "imageragturbo.adapterRule" -}}
{{- $models := join "|" .Values.prometheusAdapter.models -}}
{{- $w := .Values.prometheusAdapter.window -}}
seriesQuery: 'nv_inference_queue_duration_us{namespace!="",pod!="",model=~"{{ $models }}"}'
resources:
  overrides:
    namespace: {resource: namespace}
    pod: {resource: pod}
name:
  matches: ^nv_inference_queue_duration_us$
  as: {{ .Values.autoscaling.metricName }}
metricsQuery: >-
  sum by (<<.GroupBy>>) (rate(nv_inference_queue_duration_us{<<.LabelMatchers>>,model=~"{{ $models }}"}[{{ $w }}]))
  / clamp_min(sum by (<<.GroupBy>>) (rate(nv_inference_compute_infer_duration_us{<<.LabelMatchers>>,model=~"{{ $models }}"}[{{ $w }}])), 1)
{{- end -}}

{{- define "civicgrid.name" -}}civicgrid-operator{{- end -}}

{{- define "civicgrid.labels" -}}
app.kubernetes.io/name: {{ include "civicgrid.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "civicgrid.selectorLabels" -}}
app.kubernetes.io/name: {{ include "civicgrid.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "civicgrid.secretsNamespace" -}}
{{- default .Release.Namespace .Values.memberSecretsNamespace -}}
{{- end -}}

{{- define "civicgrid.marketplace.labels" -}}
app.kubernetes.io/name: civicgrid-marketplace
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "civicgrid.marketplace.selectorLabels" -}}
app.kubernetes.io/name: civicgrid-marketplace
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "civicgrid.postgres.selectorLabels" -}}
app.kubernetes.io/name: civicgrid-postgres
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

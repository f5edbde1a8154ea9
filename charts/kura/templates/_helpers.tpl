{{/*
Names, labels and the resolved tenant list shared by every template.

Tenant-scoped objects are named `<tenant>-<component>`: each tenant has its own namespace, so
the release name adds nothing there, while the tenant name makes `kubectl get -A` readable.
*/}}

{{- define "kura.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-scoped name, for the cluster-wide and release-namespace objects. */}}
{{- define "kura.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "kura.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
kura.objectName (list TENANT SUFFIX MAX): `<tenant>-<suffix>`, at most MAX characters. When too
long, the tenant part is shortened and a hash of the full tenant name keeps it unique. CronJobs
use MAX 52: the controller appends 11 characters to name its Jobs, and a Job name must stay a
63-character label.
*/}}
{{- define "kura.objectName" -}}
{{- $tenant := index . 0 -}}
{{- $suffix := index . 1 -}}
{{- $max := int (index . 2) -}}
{{- $full := printf "%s-%s" $tenant $suffix -}}
{{- if le (len $full) $max -}}
{{- $full -}}
{{- else -}}
{{- $keep := sub $max (add (len $suffix) 8) | int -}}
{{- if lt $keep 1 -}}
{{- fail (printf "the name %q is too long to be a Kubernetes name: shorten %q" $full $suffix) -}}
{{- end -}}
{{- printf "%s-%s-%s" (trunc $keep $tenant | trimSuffix "-") (sha256sum $tenant | trunc 6) $suffix -}}
{{- end -}}
{{- end -}}

{{/*
kura.labels (dict "root" $ "component" C ["tenant" T]): the recommended labels, on every object.
*/}}
{{- define "kura.labels" -}}
helm.sh/chart: {{ include "kura.chart" .root }}
{{ include "kura.podLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Pod template labels: the recommended labels without version and chart, because a change of
either would restart PostgreSQL and CouchDB on every chart upgrade for nothing.
*/}}
{{- define "kura.podLabels" -}}
{{ include "kura.selectorLabels" . }}
app.kubernetes.io/part-of: kura
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end -}}

{{- define "kura.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kura.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- with .tenant }}
kura.io/tenant: {{ .name }}
{{- end }}
{{- end -}}

{{/* kura.image (dict "image" IMAGE "tag" DEFAULT_TAG): repository:tag, or @digest. */}}
{{- define "kura.image" -}}
{{- $tag := .image.tag | default .tag | toString -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "kura.kuraImage" -}}
{{- include "kura.image" (dict "image" .Values.image "tag" .Chart.AppVersion) -}}
{{- end -}}

{{/*
kura.merge (dict "dst" D "src" S): deep-merges S into D in place. Maps merge key by key;
anything else (lists, scalars, false, 0, "") in S replaces D's value. Written out rather than
sprig's mergeOverwrite, which older Helm releases ship with a bug that ignores false and 0.
*/}}
{{- define "kura.merge" -}}
{{- $dst := .dst -}}
{{- range $key, $value := .src -}}
{{- $current := get $dst $key -}}
{{- if and (kindIs "map" $value) (kindIs "map" $current) -}}
{{- include "kura.merge" (dict "dst" $current "src" $value) -}}
{{- else -}}
{{- $_ := set $dst $key $value -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* kura.hashInt NAME: a stable integer (28 bits of the SHA-256 of NAME). */}}
{{- define "kura.hashInt" -}}
{{- $digits := dict "0" 0 "1" 1 "2" 2 "3" 3 "4" 4 "5" 5 "6" 6 "7" 7 "8" 8 "9" 9 "a" 10 "b" 11 "c" 12 "d" 13 "e" 14 "f" 15 -}}
{{- $n := 0 -}}
{{- range $c := splitList "" (sha256sum . | trunc 7) -}}
{{- $n = add (mul $n 16) (get $digits $c) -}}
{{- end -}}
{{- $n -}}
{{- end -}}

{{/* kura.cron (list MINUTE_OF_DAY DAY_OF_WEEK): "M H * * DOW" for a minute of the day. */}}
{{- define "kura.cron" -}}
{{- $minute := int (index . 0) -}}
{{- $dow := index . 1 -}}
{{- printf "%d %d * * %s" (mod $minute 60) (div $minute 60) $dow -}}
{{- end -}}

{{/*
kura.init: resolves every tenant once per render and keeps the result on the root context as
`KuraTenants` (a list sorted by name). Each entry is tenantDefaults deep-merged with the tenant's
values, plus: name, ns (namespace), objectStorage (merged over the global one), credentialKinds
(kura.credentialKinds of its credentials), postgresExternal and couchdbExternal (kura.externalDatabases),
apps (each merged over appDefaults, enabled only), pushgatewayUrl and notifyResolved
(kura.tenantMonitoring), and schedules.backup/status/verify.
*/}}
{{- define "kura.init" -}}
{{- if not (hasKey . "KuraTenants") -}}
{{- $root := . -}}
{{- $tenants := list -}}
{{- range $name := keys (.Values.tenants | default dict) | sortAlpha -}}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) -}}
{{- fail (printf "tenant %q: a tenant name is lowercase letters, digits and dashes, starting with a letter" $name) -}}
{{- end -}}
{{- $raw := index $root.Values.tenants $name | default dict -}}
{{- $t := deepCopy $root.Values.tenantDefaults -}}
{{- include "kura.merge" (dict "dst" $t "src" (deepCopy $raw)) -}}
{{- $os := deepCopy $root.Values.objectStorage -}}
{{- include "kura.merge" (dict "dst" $os "src" (deepCopy ($raw.objectStorage | default dict))) -}}
{{- $_ := set $t "objectStorage" $os -}}
{{- $apps := dict -}}
{{- range $appName, $app := $t.apps -}}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $appName) -}}
{{- fail (printf "tenant %q, app %q: an app name is lowercase letters, digits and dashes, starting with a letter" $name $appName) -}}
{{- end -}}
{{- if has $appName (list "postgres" "couchdb" "kura" "databases" "registry" "object-storage" "app-config" "couchdb-config" "test" "backup" "restore" "status" "verify" "apps" "dns" "default-deny" "postgres-clients" "couchdb-clients" "object-storage-clients" "kube-api" "quota" "limits" "notify" "pushgateway-clients" "notify-clients") -}}
{{- fail (printf "tenant %q, app %q: the name is taken by the chart's own objects; choose another" $name $appName) -}}
{{- end -}}
{{- $merged := deepCopy $t.appDefaults -}}
{{- include "kura.merge" (dict "dst" $merged "src" ($app | default dict)) -}}
{{- if $merged.enabled -}}
{{- if not $merged.image.repository -}}
{{- fail (printf "tenant %q, app %q: image.repository is required" $name $appName) -}}
{{- end -}}
{{- $_ := set $apps $appName $merged -}}
{{- end -}}
{{- end -}}
{{- $_ := set $t "apps" $apps -}}
{{- $_ := set $t "name" $name -}}
{{- $ns := $t.namespace.name | default (printf "%s%s" $root.Values.tenantNamespacePrefix $name) -}}
{{- if or (gt (len $ns) 63) (not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" $ns)) -}}
{{- fail (printf "tenant %q: namespace %q is not a valid namespace name (at most 63 characters)" $name $ns) -}}
{{- end -}}
{{- $_ := set $t "ns" $ns -}}
{{- $r := $t.backup.retention -}}
{{- if and $t.backup.enabled (not (or $r.keepLast $r.keepHourly $r.keepDaily $r.keepWeekly $r.keepMonthly $r.keepYearly $r.keepWithin)) -}}
{{- fail (printf "tenant %q: backup.retention needs at least one keep rule (kura refuses to prune without one)" $name) -}}
{{- end -}}
{{- $usesStorage := or $t.backup.enabled $t.restore.enabled $t.status.enabled $t.verify.enabled $t.tests.enabled -}}
{{- $kinds := include "kura.credentialKinds" $os.credentials | fromJson -}}
{{- $_ := set $t "credentialKinds" $kinds -}}
{{- if and $usesStorage (not (or $kinds.hmac $kinds.apikey)) -}}
{{- fail (printf "tenant %q: set objectStorage.credentials: accessKeyId and secretAccessKey (ICOS HMAC keys), apikey (an IBM Cloud API key), or existingSecret (with credentials.type saying which of them it holds)" $name) -}}
{{- end -}}
{{- if and $kinds.apikey $root.Values.networkPolicy.enabled (not (and $os.iamEgress.cidrs $os.iamEgress.ports)) -}}
{{- /* A rule without peers would let the Jobs reach every address. */ -}}
{{- fail (printf "tenant %q: with an API key, objectStorage.iamEgress.cidrs and ports must name where %s is (resolve it from inside the cluster)" $name $os.iamEndpoint) -}}
{{- end -}}
{{- if not (or $t.postgres.enabled $t.couchdb.enabled) -}}
{{- fail (printf "tenant %q: enable postgres or couchdb (or both)" $name) -}}
{{- end -}}
{{- include "kura.externalDatabases" (dict "root" $root "tenant" $t) -}}
{{- include "kura.tenantMonitoring" (dict "root" $root "tenant" $t) -}}
{{- include "kura.secretData" (dict "tenant" $t) -}}
{{- $tenants = append $tenants $t -}}
{{- end -}}
{{- include "kura.schedules" (dict "root" $root "tenants" $tenants) -}}
{{- $_ := set . "KuraTenants" $tenants -}}
{{- end -}}
{{- end -}}

{{/*
kura.credentialKinds CREDENTIALS: which object-storage credentials are configured, as JSON
{"hmac": bool, "apikey": bool}. An existingSecret holds what credentials.type says (the chart
cannot look inside it); without one, what the values set: both HMAC keys, the API key, or all.
*/}}
{{- define "kura.credentialKinds" -}}
{{- $hmac := false -}}
{{- $apikey := false -}}
{{- if .existingSecret -}}
{{- $type := .type | default "hmac" -}}
{{- $hmac = has $type (list "hmac" "both") -}}
{{- $apikey = has $type (list "apikey" "both") -}}
{{- else -}}
{{- $hmac = not (not (and .accessKeyId .secretAccessKey)) -}}
{{- $apikey = not (not .apikey) -}}
{{- end -}}
{{- toJson (dict "hmac" $hmac "apikey" $apikey) -}}
{{- end -}}

{{/*
kura.externalDatabases (dict "root" $ "tenant" T): databases managed outside the chart
(postgres.external, couchdb.external), resolved with their defaults into T.postgresExternal and
T.couchdbExternal (empty dicts for in-cluster servers), after the checks a render can make:
a password that is given rather than generated, a CA where the mode verifies, and addresses for
the NetworkPolicies (which match CIDRs, never names).
*/}}
{{- define "kura.externalDatabases" -}}
{{- $t := .tenant -}}
{{- $np := .root.Values.networkPolicy -}}
{{- $pg := dict -}}
{{- $ext := $t.postgres.external -}}
{{- if and $t.postgres.enabled $ext -}}
{{- if not $ext.host -}}
{{- fail (printf "tenant %q: postgres.external.host is required" $t.name) -}}
{{- end -}}
{{- $ca := $ext.caSecret | default dict -}}
{{- $pg = dict "host" $ext.host "port" (int ($ext.port | default 5432)) "sslmode" ($ext.sslmode | default "verify-full") "database" ($ext.database | default "postgres") "caSecret" ($ca.name | default "") "caKey" ($ca.key | default "ca.crt") "cidrs" (dig "egress" "cidrs" (list) $ext) -}}
{{- if and (has $pg.sslmode (list "verify-ca" "verify-full")) (not $pg.caSecret) -}}
{{- fail (printf "tenant %q: postgres.external.sslmode %s checks the server's certificate against a CA, and the kura image has none for it: set postgres.external.caSecret (an existing Secret in %s with the CA certificate), or a sslmode that does not verify (require)" $t.name $pg.sslmode $t.ns) -}}
{{- end -}}
{{- if not (or $t.postgres.auth.existingSecret $t.postgres.auth.password) -}}
{{- fail (printf "tenant %q: postgres.external needs the server's password for %s: set postgres.auth.existingSecret (a Secret in %s holding it under postgres.auth.passwordKey) or postgres.auth.password" $t.name $t.postgres.auth.username $t.ns) -}}
{{- end -}}
{{- if and $np.enabled (not $pg.cidrs) -}}
{{- fail (printf "tenant %q: postgres.external.egress.cidrs is required with networkPolicy.enabled: NetworkPolicies match addresses, not names. Resolve %s from inside the cluster (kubectl run --rm -it dns --image=busybox --restart=Never -- nslookup %s) and list its addresses, e.g. [10.240.64.5/32]" $t.name $pg.host $pg.host) -}}
{{- end -}}
{{- end -}}
{{- $_ := set $t "postgresExternal" $pg -}}
{{- $couch := dict -}}
{{- $ext = $t.couchdb.external -}}
{{- if and $t.couchdb.enabled $ext -}}
{{- if not $ext.url -}}
{{- fail (printf "tenant %q: couchdb.external.url is required" $t.name) -}}
{{- end -}}
{{- $url := urlParse ($ext.url | trimSuffix "/") -}}
{{- $tls := eq $url.scheme "https" -}}
{{- $ca := $ext.caSecret | default dict -}}
{{- $port := regexFind ":[0-9]+$" $url.host | trimPrefix ":" | default (ternary "443" "80" $tls) | int -}}
{{- $couch = dict "scheme" $url.scheme "host" $url.host "hostname" $url.hostname "port" $port "path" $url.path "caSecret" ($ca.name | default "") "caKey" ($ca.key | default "ca.crt") "cidrs" (dig "egress" "cidrs" (list) $ext) -}}
{{- if and $couch.caSecret (not $tls) -}}
{{- fail (printf "tenant %q: couchdb.external.caSecret is for an https URL; %s is plain http" $t.name $ext.url) -}}
{{- end -}}
{{- if not (or $t.couchdb.auth.existingSecret $t.couchdb.auth.password) -}}
{{- fail (printf "tenant %q: couchdb.external needs the server's password for %s: set couchdb.auth.existingSecret (a Secret in %s holding it under couchdb.auth.passwordKey) or couchdb.auth.password" $t.name $t.couchdb.auth.username $t.ns) -}}
{{- end -}}
{{- if and $np.enabled (not $couch.cidrs) -}}
{{- fail (printf "tenant %q: couchdb.external.egress.cidrs is required with networkPolicy.enabled: NetworkPolicies match addresses, not names. Resolve %s from inside the cluster (kubectl run --rm -it dns --image=busybox --restart=Never -- nslookup %s) and list its addresses, e.g. [10.240.64.6/32]" $t.name $couch.hostname $couch.hostname) -}}
{{- end -}}
{{- end -}}
{{- $_ := set $t "couchdbExternal" $couch -}}
{{- end -}}

{{/*
Staggered schedules. Each tenant without an explicit backup schedule gets a minute of the backup
window: its hash slot, or the next free one (linear probing in name order). The slot depends only
on the tenant's name and on the few tenants whose slots collide with it, so adding a tenant
leaves the other tenants' schedules where they were, except along one collision chain.
*/}}
{{- define "kura.schedules" -}}
{{- $root := .root -}}
{{- $window := $root.Values.schedule.backupWindow -}}
{{- $size := int $window.minutes -}}
{{- $start := split ":" $window.start -}}
{{- $startMinute := add (mul (atoi $start._0) 60) (atoi $start._1) | int -}}
{{- $used := dict -}}
{{- range $t := .tenants -}}
{{- $slot := mod (include "kura.hashInt" $t.name | atoi) $size | int -}}
{{- if not $t.backup.schedule -}}
{{- $placed := false -}}
{{- range $i := until $size -}}
{{- if not $placed -}}
{{- $candidate := mod (add $slot $i) $size | int -}}
{{- if not (hasKey $used (toString $candidate)) -}}
{{- $_ := set $used (toString $candidate) $t.name -}}
{{- $slot = $candidate -}}
{{- $placed = true -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $minuteOfDay := mod (add $startMinute $slot) 1440 | int -}}
{{- if regexMatch "^[0-9]+ [0-9]+ \\* \\* \\*$" ($t.backup.schedule | default "") -}}
{{- /* A fixed daily time: verify and status follow it instead of the unused slot. */ -}}
{{- $fields := splitList " " $t.backup.schedule -}}
{{- $minuteOfDay = add (mul (atoi (index $fields 1)) 60) (atoi (index $fields 0)) | int -}}
{{- end -}}
{{- $backup := $t.backup.schedule | default (include "kura.cron" (list $minuteOfDay "*")) -}}
{{- $verifyMinute := add $minuteOfDay (int $root.Values.schedule.verifyOffsetMinutes) | int -}}
{{- $verifyDay := mod (add (int $root.Values.schedule.verifyDayOfWeek) (div $verifyMinute 1440)) 7 -}}
{{- $verify := $t.verify.schedule | default (include "kura.cron" (list (mod $verifyMinute 1440) (toString $verifyDay))) -}}
{{- $status := $t.status.schedule | default (printf "%d */%d * * *" (mod $minuteOfDay 60) (int $root.Values.schedule.statusEveryHours)) -}}
{{- $_ := set $t "schedules" (dict "backup" $backup "verify" $verify "status" $status) -}}
{{- end -}}
{{- end -}}

{{/* kura.metadata (dict "root" $ "tenant" T "component" C "name" N): name, namespace, labels. */}}
{{- define "kura.metadata" -}}
name: {{ .name }}
namespace: {{ .tenant.ns }}
labels:
  {{- include "kura.labels" . | nindent 2 }}
{{- end -}}

{{/* Per-tenant object names. */}}
{{- define "kura.postgresName" -}}{{ include "kura.objectName" (list .name "postgres" 63) }}{{- end -}}
{{- define "kura.couchdbName" -}}{{ include "kura.objectName" (list .name "couchdb" 63) }}{{- end -}}

{{- define "kura.postgresSecretName" -}}
{{- .postgres.auth.existingSecret | default (include "kura.postgresName" .) -}}
{{- end -}}
{{- define "kura.couchdbSecretName" -}}
{{- .couchdb.auth.existingSecret | default (include "kura.couchdbName" .) -}}
{{- end -}}
{{- define "kura.objectStorageSecretName" -}}
{{- .objectStorage.credentials.existingSecret | default (include "kura.objectName" (list .name "object-storage" 63)) -}}
{{- end -}}

{{/*
Service URLs, without passwords: those travel in separate variables from Secrets. An external
PostgreSQL gets libpq's sslmode, and sslrootcert when its CA is mounted; an external CouchDB's CA
travels in KURA_COUCHDB_CA_FILE (kura.sourceEnv).
*/}}
{{- define "kura.postgresUrl" -}}
{{- with .postgresExternal -}}
{{- printf "postgres://%s@%s:%d/%s?sslmode=%s" $.postgres.auth.username .host (int .port) .database .sslmode -}}
{{- if .caSecret }}{{ printf "&sslrootcert=%s" (include "kura.caFile" "postgres") }}{{ end -}}
{{- else -}}
{{- printf "postgres://%s@%s.%s.svc:%d/postgres" .postgres.auth.username (include "kura.postgresName" .) .ns (int .postgres.port) -}}
{{- end -}}
{{- end -}}
{{- define "kura.couchdbUrl" -}}
{{- with .couchdbExternal -}}
{{- printf "%s://%s@%s%s" .scheme $.couchdb.auth.username .host .path -}}
{{- else -}}
{{- printf "http://%s@%s.%s.svc:%d" .couchdb.auth.username (include "kura.couchdbName" .) .ns (int .couchdb.port) -}}
{{- end -}}
{{- end -}}

{{/*
CA certificates of external databases (postgres.external.caSecret, couchdb.external.caSecret):
one projected volume, mounted read-only at /etc/kura/tls in every container of the tenant that
connects to a database, <db>/ca.crt each. CAs are public: mode 0444.
*/}}
{{- define "kura.caDir" -}}/etc/kura/tls{{- end -}}
{{- define "kura.caFile" -}}{{ include "kura.caDir" . }}/{{ . }}/ca.crt{{- end -}}

{{/* kura.hasCa T: "true" when the tenant mounts any CA, else empty. */}}
{{- define "kura.hasCa" -}}
{{- if or (get (.postgresExternal | default dict) "caSecret") (get (.couchdbExternal | default dict) "caSecret") }}true{{ end -}}
{{- end -}}

{{- define "kura.caMount" -}}
- name: tls-ca
  mountPath: {{ include "kura.caDir" . }}
  readOnly: true
{{- end -}}

{{- define "kura.caVolume" -}}
- name: tls-ca
  projected:
    # 0444
    defaultMode: 292
    sources:
      {{- range $db := list "postgres" "couchdb" }}
      {{- with get $ (printf "%sExternal" $db) }}
      {{- if .caSecret }}
      - secret:
          name: {{ .caSecret }}
          items:
            - key: {{ .caKey | quote }}
              path: {{ $db }}/ca.crt
      {{- end }}
      {{- end }}
      {{- end }}
{{- end -}}
{{- define "kura.storageUrl" -}}
{{- $prefix := .objectStorage.prefix | trimAll "/" -}}
{{- if $prefix -}}
{{- printf "s3://%s/%s" .objectStorage.bucket $prefix -}}
{{- else -}}
{{- printf "s3://%s" .objectStorage.bucket -}}
{{- end -}}
{{- end -}}

{{/* The sources a tenant has, in kura's names. */}}
{{- define "kura.sources" -}}
{{- $sources := list -}}
{{- if .postgres.enabled }}{{ $sources = append $sources "postgres" }}{{ end -}}
{{- if .couchdb.enabled }}{{ $sources = append $sources "couchdb" }}{{ end -}}
{{- toJson $sources -}}
{{- end -}}

{{/*
kura.secretValue (dict "value" V "live" SECRET "key" K): V when given; else the value the live
Secret (looked up by the caller, once per Secret) already holds, so a generated password survives
`helm upgrade`; else a new random one. Offline rendering (`helm template`) finds no live Secret and
always generates.
*/}}
{{- define "kura.secretValue" -}}
{{- if .value -}}
{{- .value -}}
{{- else if and .live .live.data (hasKey .live.data .key) -}}
{{- index .live.data .key | b64dec -}}
{{- else -}}
{{- randAlphaNum 32 -}}
{{- end -}}
{{- end -}}

{{/*
kura.secretData (dict "tenant" T): the data of the database Secrets the chart creates, as
T.postgresSecretData and T.couchdbSecretData (plain text); for an external server only the given
password, never a generated one. Computed once per render, in kura.init:
the Secret and the CouchDB pod's checksum of it must see the same generated values, and `lookup`
should run once per Secret.
*/}}
{{- define "kura.secretData" -}}
{{- $t := .tenant -}}
{{- if and $t.postgres.enabled (not $t.postgres.auth.existingSecret) $t.postgresExternal -}}
{{- $_ := set $t "postgresSecretData" (dict $t.postgres.auth.passwordKey $t.postgres.auth.password) -}}
{{- else if and $t.postgres.enabled (not $t.postgres.auth.existingSecret) -}}
{{- $auth := $t.postgres.auth -}}
{{- $live := lookup "v1" "Secret" $t.ns (include "kura.postgresName" $t) -}}
{{- $_ := set $t "postgresSecretData" (dict $auth.passwordKey (include "kura.secretValue" (dict "value" $auth.password "live" $live "key" $auth.passwordKey))) -}}
{{- end -}}
{{- if and $t.couchdb.enabled (not $t.couchdb.auth.existingSecret) $t.couchdbExternal -}}
{{- /* Only the password: the cookie secrets belong to an in-cluster CouchDB node. */ -}}
{{- $_ := set $t "couchdbSecretData" (dict $t.couchdb.auth.passwordKey $t.couchdb.auth.password) -}}
{{- else if and $t.couchdb.enabled (not $t.couchdb.auth.existingSecret) -}}
{{- $auth := $t.couchdb.auth -}}
{{- $live := lookup "v1" "Secret" $t.ns (include "kura.couchdbName" $t) -}}
{{- $data := dict $auth.passwordKey (include "kura.secretValue" (dict "value" $auth.password "live" $live "key" $auth.passwordKey)) -}}
{{- $_ := set $data $auth.cookieAuthSecretKey (include "kura.secretValue" (dict "value" "" "live" $live "key" $auth.cookieAuthSecretKey)) -}}
{{- $_ := set $data $auth.erlangCookieKey (include "kura.secretValue" (dict "value" "" "live" $live "key" $auth.erlangCookieKey)) -}}
{{- $_ := set $t "couchdbSecretData" $data -}}
{{- end -}}
{{- end -}}

{{/*
kura.containerPort DB: the port PostgreSQL or CouchDB listens on in its pod. Clients dial the
Service's `port`; a NetworkPolicy sees the packet after the Service has translated it, so its
rules name this one.
*/}}
{{- define "kura.containerPort" -}}
{{- get (dict "postgres" 5432 "couchdb" 5984) . -}}
{{- end -}}

{{/*
kura.kubeApiEgress (dict "np" networkPolicy "endpoints" ENDPOINTS): the egress rule to the API
server as JSON, or nothing when no address is known. ENDPOINTS is the `default/kubernetes`
Endpoints object (empty offline); it is used only when networkPolicy.kubeAPI.cidrs is empty, and
then its ports win over kubeAPI.ports, because the policy sees the endpoint's port (IKS:
172.20.0.1:2040), not the Service's 443.
*/}}
{{- define "kura.kubeApiEgress" -}}
{{- $cidrs := .np.kubeAPI.cidrs | default list -}}
{{- $ports := .np.kubeAPI.ports | default list -}}
{{- if not $cidrs -}}
{{- $found := list -}}
{{- range $subset := (get (.endpoints | default dict) "subsets" | default list) -}}
{{- range $address := (get $subset "addresses" | default list) -}}
{{- $cidrs = append $cidrs (printf "%s/%s" $address.ip (ternary "128" "32" (contains ":" $address.ip))) -}}
{{- end -}}
{{- range $port := (get $subset "ports" | default list) -}}
{{- if eq (get $port "protocol" | default "TCP") "TCP" -}}
{{- $found = append $found (int $port.port) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- with $found -}}
{{- $ports = uniq . -}}
{{- end -}}
{{- end -}}
{{- if $cidrs -}}
{{- $to := list -}}
{{- range $cidrs | uniq -}}
{{- $to = append $to (dict "ipBlock" (dict "cidr" .)) -}}
{{- end -}}
{{- $rules := list -}}
{{- range $ports -}}
{{- $rules = append $rules (dict "port" (int .) "protocol" "TCP") -}}
{{- end -}}
{{- toJson (dict "to" $to "ports" $rules) -}}
{{- end -}}
{{- end -}}

{{/*
kura.workloadSwitchGuard (dict "tenant" T "component" C "name" N "workload" KIND): fails the
render when the database still runs as the other kind of workload. Switching `workload` replaces
a Deployment by a StatefulSet (or back), and Helm creates the new one before it deletes the old:
both pods would mount the same ReadWriteOnce volume, which the node allows, and two servers on one
data directory corrupt it. Offline `lookup` finds nothing and this passes.
*/}}
{{- define "kura.workloadSwitchGuard" -}}
{{- $other := ternary "StatefulSet" "Deployment" (eq .workload "Deployment") -}}
{{- $live := lookup "apps/v1" $other .tenant.ns .name -}}
{{- $pods := dict -}}
{{- if $live -}}
{{- $pods = lookup "v1" "Pod" .tenant.ns "" -}}
{{- end -}}
{{- include "kura.workloadSwitchCheck" (dict "tenant" .tenant "component" .component "name" .name "other" $other "live" $live "pods" $pods) -}}
{{- end -}}

{{/*
kura.workloadSwitchCheck (dict "tenant" T "component" C "name" N "other" KIND "live" WORKLOAD
"pods" PODLIST): the decision of kura.workloadSwitchGuard, on the objects it looked up. A workload
scaled to 0 may still have a pod shutting down, hence the pods.
*/}}
{{- define "kura.workloadSwitchCheck" -}}
{{- $t := .tenant -}}
{{- if .live -}}
{{- $how := printf "scale it to 0 first and wait until its pod is gone:\n  kubectl -n %s scale %s/%s --replicas=0\n  kubectl -n %s wait --for=delete pod -l app.kubernetes.io/component=%s,kura.io/tenant=%s --timeout=5m" $t.ns (lower .other) .name $t.ns .component $t.name -}}
{{- $replicas := max (dig "spec" "replicas" 1 .live | int) (dig "status" "replicas" 0 .live | int) -}}
{{- if gt $replicas 0 -}}
{{- fail (printf "tenant %q: %s runs as a %s %s with %d replica(s); switching its workload now would start a second server on the same volume: %s" $t.name .component .other .name $replicas $how) -}}
{{- end -}}
{{- range $pod := (get (.pods | default dict) "items" | default list) -}}
{{- $labels := dig "metadata" "labels" (dict) $pod -}}
{{- $owned := false -}}
{{- range $owner := (dig "metadata" "ownerReferences" (list) $pod) -}}
{{- if and (eq $.other "StatefulSet") (eq $owner.kind "StatefulSet") (eq $owner.name $.name) -}}
{{- $owned = true -}}
{{- else if and (eq $.other "Deployment") (eq $owner.kind "ReplicaSet") (eq $owner.name (printf "%s-%s" $.name (get $labels "pod-template-hash"))) -}}
{{- $owned = true -}}
{{- end -}}
{{- end -}}
{{- if and $owned (not (has (dig "status" "phase" "" $pod) (list "Succeeded" "Failed"))) -}}
{{- fail (printf "tenant %q: pod %s of the old %s %s is still there; switching its workload now would start a second server on the same volume: %s" $t.name (dig "metadata" "name" "" $pod) .other .name $how) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
The environment every kura container gets: storage, tenant, log format, credentials. HMAC keys as
AWS_*, an API key as IBM_API_KEY_ID with IAM's endpoint; kura uses the HMAC keys when it has both.
*/}}
{{- define "kura.storageEnv" -}}
- name: HOME
  value: /tmp
- name: KURA_LOG_FORMAT
  value: json
- name: KURA_TENANT
  value: {{ .name | quote }}
{{ include "kura.objectStoreEnv" (dict "objectStorage" .objectStorage "credentialKinds" .credentialKinds "secret" (include "kura.objectStorageSecretName" .)) }}
{{- end -}}

{{/*
kura.objectStoreEnv (dict "objectStorage" OS "credentialKinds" K "secret" NAME): the bucket and
the credentials, from the Secret NAME. Shared by the tenants' Jobs (kura.storageEnv) and the
exporter, which reads every tenant and so gets no KURA_TENANT.
*/}}
{{- define "kura.objectStoreEnv" -}}
- name: KURA_STORAGE
  value: {{ include "kura.storageUrl" . | quote }}
- name: KURA_S3_ENDPOINT
  value: {{ .objectStorage.endpoint | quote }}
- name: KURA_S3_REGION
  value: {{ .objectStorage.region | quote }}
- name: KURA_S3_PATH_STYLE
  value: {{ .objectStorage.pathStyle | toString | quote }}
{{- if .credentialKinds.hmac }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .secret }}
      key: {{ .objectStorage.credentials.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .secret }}
      key: {{ .objectStorage.credentials.secretAccessKeyKey }}
{{- end }}
{{- if .credentialKinds.apikey }}
- name: IBM_API_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .secret }}
      key: {{ .objectStorage.credentials.apikeyKey }}
- name: IBM_AUTH_ENDPOINT
  value: {{ .objectStorage.iamEndpoint | quote }}
{{- end }}
{{- with .objectStorage.credentials.serviceInstanceId }}
- name: IBM_SERVICE_INSTANCE_ID
  value: {{ . | quote }}
{{- end }}
{{- end -}}

{{/* The tenant's databases as kura sources: URL without password, password from the Secret. */}}
{{- define "kura.sourceEnv" -}}
{{- if .postgres.enabled }}
- name: KURA_POSTGRES_URL
  value: {{ include "kura.postgresUrl" . | quote }}
- name: KURA_POSTGRES_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "kura.postgresSecretName" . }}
      key: {{ .postgres.auth.passwordKey }}
{{- end }}
{{- if .couchdb.enabled }}
- name: KURA_COUCHDB_URL
  value: {{ include "kura.couchdbUrl" . | quote }}
- name: KURA_COUCHDB_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "kura.couchdbSecretName" . }}
      key: {{ .couchdb.auth.passwordKey }}
{{- if get (.couchdbExternal | default dict) "caSecret" }}
- name: KURA_COUCHDB_CA_FILE
  value: {{ include "kura.caFile" "couchdb" | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The container securityContext of every container but Fluent Bit's: Pod Security restricted. */}}
{{- define "kura.containerSecurityContext" -}}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* kura.podSecurityContext IDS: the pod securityContext for the given runAsUser/Group/fsGroup. */}}
{{- define "kura.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ int .runAsUser }}
runAsGroup: {{ int .runAsGroup }}
fsGroup: {{ int .fsGroup }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Scheduling fields shared by pod specs: (dict "spec" S) with nodeSelector/tolerations/affinity/priorityClassName. */}}
{{- define "kura.scheduling" -}}
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
{{- with .priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end -}}

{{/* The tenant's ServiceAccount names. */}}
{{- define "kura.databasesServiceAccount" -}}{{ include "kura.objectName" (list .name "databases" 63) }}{{- end -}}
{{- define "kura.kuraServiceAccount" -}}{{ include "kura.objectName" (list .name "kura" 63) }}{{- end -}}

{{/* Labels that open the tenant's NetworkPolicies to a pod. */}}
{{- define "kura.clientLabels" -}}
{{- range $i, $client := . }}
{{- if $i }}{{ "\n" }}{{ end -}}
kura.io/{{ $client }}-client: "true"
{{- end }}
{{- end -}}

{{/* kura.couchdbIni (dict "root" $ "tenant" T): CouchDB settings, read from default.d. */}}
{{- define "kura.couchdbIni" -}}
[couchdb]
single_node = true
; Stable across restarts: CouchDB would persist a generated one in local.d, an emptyDir here.
uuid = {{ sha256sum (printf "%s/%s/%s" .root.Release.Namespace .root.Release.Name .tenant.name) | trunc 32 }}

[chttpd]
bind_address = any
require_valid_user_except_for_up = true
{{- range $section, $settings := .tenant.couchdb.config }}

[{{ $section }}]
{{- range $key, $value := $settings }}
{{ $key }} = {{ include "kura.scalar" $value }}
{{- end }}
{{- end }}
{{- end -}}

{{/*
kura.cronJob: a CronJob running one kura command for a tenant.
  root, tenant, component, name, schedule, suspend, job (the tenant's settings block for it),
  args, env (list of extra EnvVars), clients (list of NetworkPolicy client labels),
  recipients (true: KURA_ENCRYPT_TO from encryption.recipients), identity (true: the age identity
  from encryption.identitySecret, see kura.identityVolume).
The Job fails at once on exit codes retrying cannot fix (job.failJobOnExitCodes) and does not
count pods lost to node drains or preemption against backoffLimit.
*/}}
{{- define "kura.cronJob" -}}
{{- $t := .tenant -}}
{{- $job := .job -}}
{{- $identity := and .identity $t.encryption.identitySecret -}}
apiVersion: batch/v1
kind: CronJob
metadata:
  {{- include "kura.metadata" (dict "root" .root "tenant" $t "component" .component "name" .name) | nindent 2 }}
spec:
  schedule: {{ .schedule | quote }}
  timeZone: {{ .root.Values.schedule.timeZone | quote }}
  suspend: {{ .suspend }}
  # Two runs against one tenant would only queue on kura's lock or the database.
  concurrencyPolicy: Forbid
  {{- with $job.startingDeadlineSeconds }}
  startingDeadlineSeconds: {{ int . }}
  {{- end }}
  successfulJobsHistoryLimit: {{ int $job.successfulJobsHistoryLimit }}
  failedJobsHistoryLimit: {{ int $job.failedJobsHistoryLimit }}
  jobTemplate:
    metadata:
      labels:
        {{- include "kura.labels" (dict "root" .root "component" .component "tenant" $t) | nindent 8 }}
    spec:
      activeDeadlineSeconds: {{ int $job.activeDeadlineSeconds }}
      backoffLimit: {{ int $job.backoffLimit }}
      ttlSecondsAfterFinished: {{ int $job.ttlSecondsAfterFinished }}
      podFailurePolicy:
        rules:
          {{- with $job.failJobOnExitCodes }}
          - action: FailJob
            onExitCodes:
              containerName: kura
              operator: In
              values:
                {{- range . }}
                - {{ int . }}
                {{- end }}
          {{- end }}
          - action: Ignore
            onPodConditions:
              - type: DisruptionTarget
                status: "True"
      template:
        metadata:
          labels:
            {{- include "kura.podLabels" (dict "root" .root "component" .component "tenant" $t) | nindent 12 }}
            {{- with include "kura.clientLabels" .clients | trim }}{{ . | nindent 12 }}{{ end }}
          {{- with $job.podAnnotations }}
          annotations:
            {{- toYaml . | nindent 12 }}
          {{- end }}
        spec:
          restartPolicy: Never
          serviceAccountName: {{ include "kura.kuraServiceAccount" $t }}
          automountServiceAccountToken: false
          enableServiceLinks: false
          securityContext:
            {{- include "kura.podSecurityContext" $t.kuraPodSecurityContext | nindent 12 }}
          {{- with include "kura.scheduling" $job | trim }}{{ . | nindent 10 }}{{ end }}
          containers:
            - name: kura
              image: {{ include "kura.kuraImage" .root }}
              imagePullPolicy: {{ .root.Values.image.pullPolicy }}
              command: ["/usr/local/bin/kura"]
              args:
                {{- toYaml .args | nindent 16 }}
              env:
                {{- include "kura.storageEnv" $t | nindent 16 }}
                {{- include "kura.sourceEnv" $t | trim | nindent 16 }}
                {{- if .recipients }}
                {{- with include "kura.encryptToEnv" $t | trim }}{{ . | nindent 16 }}{{ end }}
                {{- end }}
                {{- if $identity }}
                {{- include "kura.identityEnv" $t | nindent 16 }}
                {{- end }}
                {{- with .env }}
                {{- toYaml . | nindent 16 }}
                {{- end }}
                {{- with $job.extraEnv }}
                {{- toYaml . | nindent 16 }}
                {{- end }}
              resources:
                {{- toYaml $job.resources | nindent 16 }}
              securityContext:
                {{- include "kura.containerSecurityContext" . | nindent 16 }}
              # kura streams and keeps nothing on disk; pg_dump and psql may want a scratch dir.
              volumeMounts:
                - name: tmp
                  mountPath: /tmp
                {{- if $identity }}
                - name: age-identity
                  mountPath: {{ include "kura.identityDir" . }}
                  readOnly: true
                {{- end }}
                {{- if include "kura.hasCa" $t }}
                {{- include "kura.caMount" . | nindent 16 }}
                {{- end }}
          volumes:
            - name: tmp
              emptyDir:
                sizeLimit: {{ $job.tmpSizeLimit }}
            {{- if $identity }}
            {{- include "kura.identityVolume" $t | nindent 12 }}
            {{- end }}
            {{- if include "kura.hasCa" $t }}
            {{- include "kura.caVolume" $t | nindent 12 }}
            {{- end }}
{{- end -}}

{{/*
age encryption (tenant encryption.*). Public keys only: KURA_ENCRYPT_TO, for the Jobs that write
or check backups, and nothing when no recipients are set.
*/}}
{{- define "kura.encryptToEnv" -}}
{{- with .encryption.recipients }}
- name: KURA_ENCRYPT_TO
  value: {{ join "," . | quote }}
{{- end }}
{{- end -}}

{{/*
The age identity (secret key): the operator's Secret encryption.identitySecret, never one the
chart creates, mounted read-only into the Jobs that decrypt (restore, verify --deep) and nowhere
else. Mode 0400: with the pod's fsGroup the kubelet makes the file root:<fsGroup> 0440, readable
by kura's user through its group and by no other UID.
*/}}
{{- define "kura.identityDir" -}}/etc/kura/age{{- end -}}
{{- define "kura.identityFile" -}}{{ include "kura.identityDir" . }}/identity.txt{{- end -}}

{{- define "kura.identityEnv" -}}
- name: KURA_IDENTITY_FILE
  value: {{ include "kura.identityFile" . | quote }}
{{- end -}}

{{- define "kura.identityVolume" -}}
- name: age-identity
  secret:
    secretName: {{ .encryption.identitySecret }}
    # 0400
    defaultMode: 256
    items:
      - key: {{ .encryption.identityKey | quote }}
        path: identity.txt
{{- end -}}

{{/*
kura.scalar VALUE: a value as text. Helm reads every number in values as a float, and Go prints
large floats in exponent form (8e+06); whole numbers are printed as integers instead.
*/}}
{{- define "kura.scalar" -}}
{{- if and (kindIs "float64" .) (eq . (float64 (int64 .))) -}}
{{- int64 . -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end -}}
